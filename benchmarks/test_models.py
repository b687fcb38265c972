"""Images/s per model and batch: forward under inference_mode, and facedeit's train step against a bare PyTorch loop.

Inputs are random 160x160 batches already on the device, so these rows time
the model alone. test_data_path.py times the loader that feeds it.
"""

import copy
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from torch import nn

from facedeit import bench
from facedeit.models import build_model
from facedeit.optim import build_optimizer, build_train_loss
from facedeit.recipes import load_recipe, resolve
from facedeit.train import autocast_for, train_step, uses_channels_last

CONFIG = bench.load_config()
IMG_SIZE = 160
# People in the default crop cache (LFW, 20 or more photos each). The head is a
# negligible share of the FLOPs, so the exact count hardly moves the figures.
NUM_CLASSES = 62
# The harness side of the train benchmark takes its optimizer and loss from this
# recipe: AdamW in one parameter group, plain cross-entropy, no clipping.
HARNESS_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "seed_adamw.yaml"

CASES = [pytest.param(model, batch, id=f"{model}-b{batch}") for model in CONFIG.models for batch in CONFIG.batches]


def build_case(model_name: str, batch: int, device: torch.device):
    """Return (model, images, targets) on `device`, in channels_last where training uses it."""
    if model_name == "inception_resnet_v1":
        pytest.importorskip("facenet_pytorch")
    torch.manual_seed(0)
    model = build_model(model_name, NUM_CLASSES, IMG_SIZE).to(device)
    images = torch.randn(batch, 3, IMG_SIZE, IMG_SIZE, device=device)
    targets = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    if uses_channels_last(model, device):
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    return model, images, targets


def model_flops(cache: dict, model_name: str, model: nn.Module, device: torch.device, train: bool) -> float:
    key = (model_name, train)
    if key not in cache:
        cache[key] = bench.count_flops_per_image(model, IMG_SIZE, device, train)
    return cache[key]


def model_columns(model: nn.Module, device: torch.device, config: bench.BenchConfig) -> dict:
    return {
        "img_size": IMG_SIZE,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "channels_last": uses_channels_last(model, device),
        "compiled": config.compile,
    }


def bare_adamw(bare_model: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.optim.AdamW:
    """Build a torch.optim.AdamW over `bare_model` with the parameter groups and settings of `optimizer`.

    `bare_model` must be a copy of `model`, so that parameters match by position.
    """
    if type(optimizer) is not torch.optim.AdamW:
        raise TypeError(f"{HARNESS_RECIPE.name}: the bare loop copies a torch.optim.AdamW, got {type(optimizer).__name__}")
    position = {id(p): i for i, p in enumerate(model.parameters())}
    bare_params = list(bare_model.parameters())
    groups = []
    for group in optimizer.param_groups:
        settings = {key: value for key, value in group.items() if key != "params"}
        groups.append({**settings, "params": [bare_params[position[id(p)]] for p in group["params"]]})
    return torch.optim.AdamW(groups)


@pytest.mark.parametrize(("model_name", "batch"), CASES)
def test_forward(benchmark, record, bench_config, peak, flops_cache, model_name, batch):
    device = bench_config.device
    benchmark.group = f"forward b{batch}"
    with bench.skip_on_cuda_oom(f"{model_name} forward at batch {batch}"):
        model, images, _ = build_case(model_name, batch, device)
        flops = model_flops(flops_cache, model_name, model, device, train=False)
        model.eval()
        network = torch.compile(model) if bench_config.compile else model

        def forward():
            with torch.inference_mode(), autocast_for(device):
                network(images)

        times = bench.StepTimes(device)
        benchmark.pedantic(times.wrap(forward), rounds=bench_config.rounds, warmup_rounds=bench_config.warmup)

    record(bench.throughput_row(
        bench_config, device, model_name, batch, "forward", times.measured(bench_config.rounds), batch,
        flops, peak, **model_columns(model, device, bench_config)))


@pytest.mark.parametrize(("model_name", "batch"), CASES)
def test_train_step(benchmark, record, bench_config, peak, flops_cache, model_name, batch):
    """Time facedeit.train.train_step, with a bare PyTorch step in pedantic mode's setup before each round.

    The two alternate, so both see the same machine load, and both start from the
    same weights. pytest-benchmark's statistics are the harness step's. The
    bare step is timed by the same kind of BatchTimer, and its row goes to the
    CSV and into extra_info.
    """
    device = bench_config.device
    benchmark.group = f"train b{batch}"
    run = resolve(load_recipe(HARNESS_RECIPE), "full")
    with bench.skip_on_cuda_oom(f"{model_name} train step at batch {batch}"):
        model, images, targets = build_case(model_name, batch, device)
        flops = model_flops(flops_cache, model_name, model, device, train=True)
        model.train()
        optimizer = build_optimizer(model, run)
        loss_fn = build_train_loss(run)
        params = [p for p in model.parameters() if p.requires_grad]

        bare_model = copy.deepcopy(model)
        bare_optimizer = bare_adamw(bare_model, model, optimizer)
        bare_loss = nn.CrossEntropyLoss()
        bare_autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext

        network = torch.compile(model) if bench_config.compile else model
        bare_network = torch.compile(bare_model) if bench_config.compile else bare_model

        def harness_step():
            train_step(network, images, targets, optimizer, loss_fn, device, params, run.recipe.clip_grad)

        def bare_step():
            with bare_autocast():
                loss = bare_loss(bare_network(images), targets)
            bare_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            bare_optimizer.step()

        harness_times = bench.StepTimes(device)
        bare_times = bench.StepTimes(device)
        benchmark.pedantic(harness_times.wrap(harness_step), setup=bare_times.wrap(bare_step),
                           rounds=bench_config.rounds, warmup_rounds=bench_config.warmup)

        # The one step train_step adds to the bare loop, timed alone on the gradients the last round left.
        norm_times = bench.StepTimes(device)
        grad_norm = norm_times.wrap(lambda: torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        for _ in range(5):
            grad_norm()

    rounds = bench_config.rounds
    columns = model_columns(model, device, bench_config)
    bare = bench.throughput_row(bench_config, device, model_name, batch, "bare_train",
                                bare_times.measured(rounds), batch, flops, peak, **columns)
    harness = bench.throughput_row(bench_config, device, model_name, batch, "train",
                                   harness_times.measured(rounds), batch, flops, peak, **columns)
    # Each round's bare step ran just before its harness step, so their ratio
    # cancels slow drifts of the machine. The spread over rounds shows the noise.
    round_ratios = [b / h for b, h in zip(bare_times.measured(rounds), harness_times.measured(rounds))]
    grad_norm_ms = bench.summarize(norm_times.measured(5), 1)["ms_median"]
    grad_norm_share = grad_norm_ms / bare["ms_median"]
    gap_ms = harness["ms_median"] - bare["ms_median"]
    harness.update(
        bare_images_per_s=bare["images_per_s"],
        ratio_to_bare=harness["images_per_s"] / bare["images_per_s"],
        ratio_round_min=min(round_ratios),
        ratio_round_max=max(round_ratios),
        grad_norm_ms=grad_norm_ms,
        grad_norm_share=grad_norm_share,
        gap_note=(f"harness {harness['ms_median']:.1f} ms, bare {bare['ms_median']:.1f} ms per step "
                  f"({gap_ms:+.1f} ms), per-round ratios {min(round_ratios):.3f} to {max(round_ratios):.3f}. "
                  f"train_step adds one get_total_norm pass over the gradients, which takes "
                  f"{grad_norm_ms:.2f} ms ({grad_norm_share:.1%} of the bare step) when timed alone."),
    )
    record(harness)
    # The bare step has no pytest-benchmark entry of its own: its row goes to the
    # CSV and, nested, into the harness benchmark's extra_info.
    record(bare, extra_info_key="bare_train")
