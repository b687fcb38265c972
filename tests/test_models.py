import pytest
import torch

from facedeit.models import MODEL_NAMES, build_model, load_start_weights


@pytest.mark.parametrize("name", ["deit_tiny_ls", "resnet18", "inception_resnet_v1"])
def test_forward_at_160(name):
    model = build_model(name, num_classes=7).eval()
    with torch.inference_mode():
        assert model(torch.randn(2, 3, 160, 160)).shape == (2, 7)


@pytest.mark.parametrize("name, width, depth, heads, params_m", [
    ("deit_tiny_ls", 192, 12, 3, 5.5), ("deit_small_ls", 384, 12, 6, 21.7), ("deit_base_ls", 768, 12, 12, 85.7),
])
def test_deit_ls_layout(name, width, depth, heads, params_m):
    model = build_model(name, num_classes=10)
    assert model.embed_dim == width
    assert len(model.blocks) == depth
    assert model.blocks[0].attn.num_heads == heads
    # Position embedding over the 10x10 patches only; the cls token is added after it.
    assert model.pos_embed.shape == (1, 100, width)
    assert model.no_embed_class
    assert model.cls_token.shape == (1, 1, width)
    assert torch.all(model.blocks[0].ls1.gamma == 1e-4)
    assert model.blocks[0].norm1.eps == 1e-6
    assert model.blocks[0].attn.qkv.bias is not None
    assert model.blocks[0].mlp.fc1.out_features == 4 * width
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params_m, abs=0.2)


def test_every_name_builds():
    for name in MODEL_NAMES:
        assert build_model(name, num_classes=3) is not None


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'vit_giant'"):
        build_model("vit_giant", 3)


def test_start_checkpoint_partial_load(tmp_path):
    source = build_model("deit_tiny_ls", num_classes=5)
    path = tmp_path / "start.pt"
    torch.save({"model": source.state_dict()}, path)
    target = build_model("deit_tiny_ls", num_classes=8, checkpoint=str(path))
    assert torch.equal(target.pos_embed, source.pos_embed)
    assert target.head.weight.shape == (8, 192)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_start_weights(target, tmp_path / "missing.pt")


def test_corrupt_start_checkpoint_is_named(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pt: not a readable torch checkpoint"):
        build_model("resnet18", num_classes=3, checkpoint=str(path))
