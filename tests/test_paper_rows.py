"""One test per row of Table 9 in Touvron et al., arXiv 2012.12877: each row is in effect."""

import collections
import dataclasses
import math

import pytest
import torch
from timm.data import Mixup
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from timm.layers import DropPath
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torchvision import transforms as tv

from facedeit.data import build_mixup, build_train_sampler, build_transforms
from facedeit.models import build_model
from facedeit.optim import build_optimizer, build_scheduler, build_train_loss, schedule_lengths
from facedeit.recipes import load_recipe, resolve
from facedeit.train import train_one_epoch
from tests.conftest import REPO

DEIT_B = load_recipe(REPO / "recipes/deit_b_paper_tiny.yaml")
VIT_B = load_recipe(REPO / "recipes/vit_b_paper_tiny.yaml")


def _resolved(recipe, **changes):
    return resolve(dataclasses.replace(recipe, **changes), "full")


def _transform_types(transform):
    return [type(t) for t in transform.transforms]


def _lrs_over_run(run, steps_per_epoch):
    model = nn.Linear(4, 2)
    optimizer = build_optimizer(model, run)
    scheduler = build_scheduler(optimizer, run, steps_per_epoch)
    lrs = []
    for update in range(run.epochs * steps_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step_update(num_updates=update + 1)
    return lrs


def test_epochs_batch_and_lr_rule():
    run = resolve(load_recipe(REPO / "recipes/deit_b_paper.yaml"), "full")
    assert (run.epochs, run.batch_size) == (300, 1024)
    assert run.lr == pytest.approx(0.0005 * 1024 / 512)
    vit = resolve(load_recipe(REPO / "recipes/vit_b_paper.yaml"), "full")
    assert (vit.epochs, vit.batch_size, vit.lr) == (300, 4096, 0.003)


@pytest.mark.parametrize("recipe, warmup_epochs", [(DEIT_B, 5), (VIT_B, 3.4)])
def test_cosine_lr_at_key_updates(recipe, warmup_epochs):
    run = _resolved(recipe, epochs=20)
    steps_per_epoch = 10
    lengths = schedule_lengths(run, steps_per_epoch)
    warmup = lengths["warmup_updates"]
    assert warmup == int(-(-warmup_epochs * steps_per_epoch // 1))  # ceil, in updates
    lrs = _lrs_over_run(run, steps_per_epoch)
    schedule = recipe.schedule
    # The first update runs at warmup_lr: the warmup starts at step 0, not one epoch late.
    assert lrs[0] == pytest.approx(schedule.warmup_lr)
    assert lrs[1] == pytest.approx(schedule.warmup_lr + (run.lr - schedule.warmup_lr) / warmup)
    assert lrs[warmup] == pytest.approx(run.lr)
    assert max(lrs) == pytest.approx(run.lr)
    total, last = lengths["total_updates"], len(lrs) - 1
    t = last - warmup
    cosine = schedule.min_lr + 0.5 * (run.lr - schedule.min_lr) * (1 + math.cos(math.pi * t / (total - warmup)))
    assert lrs[last] == pytest.approx(cosine)
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))  # decays monotonically


def test_step_schedule_decay_points():
    recipe = load_recipe(REPO / "recipes/seed_sgd.yaml")
    lrs = _lrs_over_run(_resolved(recipe), steps_per_epoch=4)
    assert lrs[0] == pytest.approx(1e-2)
    assert lrs[7 * 4 - 1] == pytest.approx(1e-2)
    assert lrs[7 * 4] == pytest.approx(1e-3)
    assert lrs[14 * 4] == pytest.approx(1e-4)


def test_weight_decay_groups():
    run = _resolved(DEIT_B)
    model = build_model("deit_tiny_ls", 10)
    optimizer = build_optimizer(model, run)
    assert isinstance(optimizer, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    by_decay = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    assert set(by_decay) == {0.0, 0.05}
    no_decay = by_decay[0.0]
    assert {"pos_embed", "cls_token", "blocks.0.attn.qkv.bias", "blocks.0.norm1.weight", "norm.weight",
            "blocks.0.ls1.gamma"} <= no_decay
    assert {"blocks.0.attn.qkv.weight", "head.weight", "patch_embed.proj.weight"} <= by_decay[0.05]
    group = optimizer.param_groups[0]
    assert (group["betas"], group["eps"]) == ((0.9, 0.999), 1e-8)


def test_team_recipe_decays_every_tensor():
    run = _resolved(load_recipe(REPO / "recipes/seed_adamw.yaml"))
    optimizer = build_optimizer(build_model("deit_tiny_ls", 10), run)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01]


def test_sgd_without_nesterov():
    optimizer = build_optimizer(nn.Linear(4, 2), _resolved(load_recipe(REPO / "recipes/seed_sgd.yaml")))
    assert isinstance(optimizer, torch.optim.SGD)
    assert (optimizer.param_groups[0]["momentum"], optimizer.param_groups[0]["nesterov"]) == (0.9, False)


def test_label_smoothing_in_the_loss():
    no_mix = _resolved(DEIT_B, augment=dataclasses.replace(DEIT_B.augment, mixup=0.0, cutmix=0.0))
    loss = build_train_loss(no_mix)
    assert isinstance(loss, LabelSmoothingCrossEntropy)
    assert loss.smoothing == 0.1
    assert isinstance(build_train_loss(_resolved(DEIT_B)), SoftTargetCrossEntropy)
    assert isinstance(build_train_loss(_resolved(VIT_B)), nn.CrossEntropyLoss)
    # Under mixup the smoothing moves into the targets.
    assert build_mixup(_resolved(DEIT_B), 10).label_smoothing == 0.1


def test_mixup_cutmix_targets_and_off():
    mixup = build_mixup(_resolved(DEIT_B), num_classes=4)
    assert isinstance(mixup, Mixup)
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.switch_prob, mixup.mix_prob) == (0.8, 1.0, 0.5, 1.0)
    images = torch.rand(6, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    mixed, soft = mixup(images.clone(), labels)
    assert soft.shape == (6, 4)
    assert not torch.equal(mixed, images)
    assert (soft.max(dim=1).values < 1.0).all()  # no one-hot target is left
    assert build_mixup(_resolved(VIT_B), 4) is None


def test_repeated_aug_three_per_index():
    dataset = list(range(50))
    run = _resolved(DEIT_B, augment=dataclasses.replace(DEIT_B.augment, repeated_aug_epoch="repeats"))
    sampler = build_train_sampler(dataset, run, num_replicas=1, rank=0)
    sampler.set_epoch(0)
    counts = collections.Counter(sampler)
    assert len(sampler) == 150
    assert set(counts) == set(dataset)
    assert set(counts.values()) == {3}


def test_repeated_aug_dataset_length_epoch():
    for size in (10, 50, 300):
        sampler = build_train_sampler(list(range(size)), _resolved(DEIT_B), num_replicas=1, rank=0)
        sampler.set_epoch(1)
        indices = list(sampler)
        assert len(indices) == len(sampler) == size
        counts = collections.Counter(indices)
        # Each chosen image comes three times in a row; only the last may be cut short.
        assert sorted(counts.values())[1:] == [3] * (len(counts) - 1)
        assert indices[0] == indices[1] == indices[2]


def test_vit_b_sampler_shows_each_image_once():
    sampler = build_train_sampler(list(range(10)), _resolved(VIT_B))
    sampler.set_epoch(0)
    assert sorted(sampler) == list(range(10))


def test_randaugment_erasing_train_only():
    train, evaluate = build_transforms(_resolved(DEIT_B))
    train_types, eval_types = _transform_types(train), _transform_types(evaluate)
    assert RandAugment in train_types
    assert RandomErasing in train_types
    assert RandAugment not in eval_types
    assert RandomErasing not in eval_types
    rand_augment = next(t for t in train.transforms if isinstance(t, RandAugment))
    assert rand_augment.num_layers == 2
    assert rand_augment.ops[0].magnitude == 9
    assert rand_augment.ops[0].magnitude_std == 0.5
    erasing = next(t for t in train.transforms if isinstance(t, RandomErasing))
    assert (erasing.probability, erasing.mode) == (0.25, "pixel")
    vit_train, _ = build_transforms(_resolved(VIT_B))
    assert RandAugment not in _transform_types(vit_train)
    assert RandomErasing not in _transform_types(vit_train)


def test_team_recipe_only_flips():
    train, _ = build_transforms(_resolved(load_recipe(REPO / "recipes/seed_adamw.yaml")))
    flips = [t for t in train.transforms if isinstance(t, tv.RandomHorizontalFlip)]
    assert len(flips) == 1
    assert flips[0].p == 0.5
    assert not {RandAugment, RandomErasing, tv.ColorJitter} & set(_transform_types(train))
    image = torch.rand(3, 160, 160)
    from PIL import Image
    pil = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype("uint8"))
    out = train(pil)
    assert out.shape == (3, 160, 160)


def test_dropout_and_drop_path_rates():
    vit = build_model("deit_tiny_ls", 10, dropout=VIT_B.model.dropout, drop_path_rate=VIT_B.model.drop_path_rate)
    assert vit.head_drop.p == 0.1
    assert vit.pos_drop.p == 0.1
    assert vit.blocks[0].mlp.drop1.p == 0.1
    assert vit.blocks[0].attn.proj_drop.p == 0.1
    assert not isinstance(vit.blocks[0].drop_path1, DropPath)

    deit = build_model("deit_tiny_ls", 10, dropout=DEIT_B.model.dropout, drop_path_rate=DEIT_B.model.drop_path_rate,
                       drop_path_mode=DEIT_B.model.drop_path_mode)
    assert DEIT_B.model.drop_path_mode == "constant"
    rates = [b.drop_path1.drop_prob for b in deit.blocks] + [b.drop_path2.drop_prob for b in deit.blocks]
    assert rates == [0.1] * 24
    assert deit.head_drop.p == 0.0

    linear = build_model("deit_tiny_ls", 10, drop_path_rate=0.1, drop_path_mode="linear")
    assert not isinstance(linear.blocks[0].drop_path1, DropPath)  # rate 0 at the first block
    assert linear.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)


def test_gradient_clipping_bounds_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    seen = []

    class RecordingSGD(torch.optim.SGD):
        def step(self, closure=None):
            seen.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item())
            return super().step(closure)

    class NoSchedule:
        def step_update(self, num_updates):
            pass

    images = torch.randn(4, 3, 8, 8) * 100
    loader = [(images, torch.tensor([0, 1, 2, 3]))]
    for clip in (None, 1.0):
        seen.clear()
        rows = train_one_epoch(model, loader, RecordingSGD(model.parameters(), lr=0.0), NoSchedule(),
                               nn.CrossEntropyLoss(), None, torch.device("cpu"), 0, 0, clip_grad=clip)
        assert rows[0]["grad_norm"] > 1.0  # the norm before clipping is what steps.csv records
        if clip is None:
            assert seen[0] > 1.0
        else:
            assert seen[0] == pytest.approx(1.0, rel=1e-4)
    assert VIT_B.clip_grad == 1.0
    assert DEIT_B.clip_grad is None


def test_randaugment_posterize_at_zero_bits():
    # RandAugment "inc1" posterizes to 0 bits when a sampled magnitude reaches 10;
    # Pillow 13 rejects that, so the install pins an older Pillow.
    from PIL import Image
    from timm.data.auto_augment import posterize

    image = Image.new("RGB", (8, 8), (200, 100, 50))
    assert posterize(image, 0).getpixel((0, 0)) == (0, 0, 0)
