"""Build a classifier by name, randomly initialised; nothing is downloaded."""

import logging
import pickle
from functools import partial
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

# DeiT III `vit_models` sizes (facebookresearch/deit, models_v2.py): width, depth, heads.
DEIT_LS_SIZES = {
    "deit_tiny_ls": (192, 12, 3),
    "deit_small_ls": (384, 12, 6),
    "deit_base_ls": (768, 12, 12),
}
CNN_NAMES = ("resnet18", "resnet50", "inception_resnet_v1")
MODEL_NAMES = tuple(DEIT_LS_SIZES) + CNN_NAMES
DROP_PATH_MODES = ("constant", "linear")


def build_deit_ls(
    name: str,
    num_classes: int,
    img_size: int = 160,
    dropout: float = 0.0,
    drop_path_rate: float = 0.0,
    drop_path_mode: str = "constant",
) -> nn.Module:
    """Build a DeiT III `vit_models` with LayerScale out of timm's VisionTransformer.

    The layout follows deit's models_v2.py: patch 16, MLP ratio 4, qkv bias,
    LayerNorm eps 1e-6, LayerScale initialised to 1e-4, and a position
    embedding over the patches only, with the cls token concatenated after it
    (timm's `no_embed_class=True`).

    `dropout` is applied after the position embedding, after every dense
    layer except the qkv projection, and before the head.
    `drop_path_mode="constant"` gives every block the same stochastic-depth
    rate, as models_v2.py does. `"linear"` keeps timm's ramp from 0 at the
    first block to `drop_path_rate` at the last.
    """
    from timm.models.vision_transformer import VisionTransformer
    from timm.layers import DropPath

    width, depth, heads = DEIT_LS_SIZES[name]
    model = VisionTransformer(
        img_size=img_size,
        patch_size=16,
        num_classes=num_classes,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        init_values=1e-4,
        class_token=True,
        no_embed_class=True,
        global_pool="token",
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        drop_rate=dropout,
        pos_drop_rate=dropout,
        proj_drop_rate=dropout,
        drop_path_rate=drop_path_rate,
    )
    if drop_path_mode == "constant" and drop_path_rate > 0:
        for block in model.blocks:
            block.drop_path1 = DropPath(drop_path_rate)
            block.drop_path2 = DropPath(drop_path_rate)
    elif drop_path_mode not in DROP_PATH_MODES:
        raise ValueError(f"drop_path_mode must be one of {DROP_PATH_MODES}, got {drop_path_mode!r}")
    return model


def build_model(
    name: str,
    num_classes: int,
    img_size: int = 160,
    dropout: float = 0.0,
    drop_path_rate: float = 0.0,
    drop_path_mode: str = "constant",
    checkpoint: str | None = None,
) -> nn.Module:
    """Build model `name` with a `num_classes` head, optionally starting from a local checkpoint."""
    if name in DEIT_LS_SIZES:
        model = build_deit_ls(name, num_classes, img_size, dropout, drop_path_rate, drop_path_mode)
    elif name in ("resnet18", "resnet50"):
        import torchvision

        if drop_path_rate > 0:
            raise ValueError(f"{name} has no stochastic depth; set drop_path_rate to 0")
        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
        if dropout > 0:
            model.fc = nn.Sequential(nn.Dropout(dropout), model.fc)
    elif name == "inception_resnet_v1":
        from facenet_pytorch import InceptionResnetV1

        if drop_path_rate > 0:
            raise ValueError(f"{name} has no stochastic depth; set drop_path_rate to 0")
        # facenet-pytorch's own dropout sits before the embedding layer.
        model = InceptionResnetV1(
            pretrained=None, classify=True, num_classes=num_classes, dropout_prob=dropout
        )
    else:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")

    if checkpoint:
        load_start_weights(model, Path(checkpoint))
    return model


def load_start_weights(model: nn.Module, path: Path) -> None:
    """Copy the tensors of a local checkpoint whose names and shapes match; log the rest.

    A head trained for another number of people does not match and keeps its
    random initialisation.
    """
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(err).__name__})") from None
    if isinstance(state, dict) and "model" in state:
        state = state["model"]
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(matched))
    model.load_state_dict(matched, strict=False)
    log.info("loaded %d tensors from %s; skipped %d: %s", len(matched), path, len(skipped), skipped[:5])
