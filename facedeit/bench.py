"""Shared parts of the throughput benchmarks in benchmarks/: settings, timing, FLOPs, peaks and the CSV.

`make bench` runs those suites under pytest-benchmark. Every benchmarked call
is also timed with facedeit.timing.BatchTimer (CUDA events and a synchronize
on a GPU, perf_counter on the CPU), the timer behind training's steps.csv,
and the images/s in the CSV comes from those times.

Settings are read from FACEDEIT_BENCH_* environment variables (listed in
benchmarks/README.md and read by load_config), so the same suites run a full
CPU or GPU table and a one-round smoke run.
"""

import functools
import math
import os
import statistics
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from facedeit.distributed import pick_device
from facedeit.io import write_csv_atomic
from facedeit.models import MODEL_NAMES
from facedeit.runs import device_name, git_commit, now_utc
from facedeit.sources import SHARED_LFW
from facedeit.timing import BatchTimer

ENV_PREFIX = "FACEDEIT_BENCH_"
# NOTE: the CUDA settings and code paths have not run on a GPU yet; only the CPU run is committed.
DEFAULT_BATCHES = {"cpu": (32, 64), "cuda": (64, 256, 1024)}
DEFAULT_ROUNDS = {"cpu": 3, "cuda": 10}
DEFAULT_WARMUP = {"cpu": 1, "cuda": 3}
DEFAULT_MTCNN_PHOTOS = {"cpu": 16, "cuda": 64}

# Values of the CSV's `phase` column.
PHASES = ("forward", "train", "bare_train", "loader", "mtcnn_single", "mtcnn_batched")

# NVIDIA's datasheet peaks for dense bf16 tensor-core math (without sparsity), in
# FLOP/s, matched as substrings of torch.cuda.get_device_name. The H100 and H200
# figures are for the SXM parts. PCIe and NVL parts have lower peaks, so
# cuda_peak returns no peak for them.
CUDA_BF16_PEAKS = (
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
)
CUDA_PEAK_SOURCE = "vendor spec: dense bf16"

# Columns of results/benchmarks/benchmarks-<device kind>.csv, in order.
COLUMNS = [
    "device_kind", "device", "model", "img_size", "batch", "phase", "precision", "channels_last", "compiled",
    "rounds", "warmup_rounds", "ms_median", "ms_min", "ms_max", "images_per_s",
    "flops_per_image", "achieved_flops_per_s", "peak_flops_per_s", "peak_source", "fraction_of_peak",
    "bare_images_per_s", "ratio_to_bare", "ratio_round_min", "ratio_round_max", "grad_norm_ms", "grad_norm_share",
    "gap_note",
    "loader_workers", "loader_model", "note",
    "ratio_to_resnet18", "model_train_images_per_s", "loader_to_model_ratio",
    "fastest_model", "loader_to_fastest_ratio",
    "torch", "git_commit", "finished",
]


@dataclass(frozen=True)
class BenchConfig:
    """The benchmark settings of one pytest session."""

    device: torch.device
    models: tuple[str, ...]
    batches: tuple[int, ...]
    rounds: int
    warmup: int
    compile: bool
    out_dir: Path
    crops_dir: Path
    photos_dir: Path
    mtcnn_photos: int
    loader_images: int
    peak_size: int

    @property
    def kind(self) -> str:
        return self.device.type


def _env(name: str) -> str | None:
    value = os.environ.get(ENV_PREFIX + name, "").strip()
    return value or None


def _env_int(name: str, default: int, minimum: int) -> int:
    value = _env(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name}: expected an integer, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{ENV_PREFIX}{name}: must be at least {minimum}, got {number}")
    return number


def _env_ints(name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    value = _env(name)
    if value is None:
        return default
    try:
        numbers = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name}: expected comma-separated integers, got {value!r}") from None
    if not numbers or min(numbers) < 1:
        raise ValueError(f"{ENV_PREFIX}{name}: expected positive integers, got {value!r}")
    return numbers


def _env_models() -> tuple[str, ...]:
    value = _env("MODELS")
    if value is None:
        return MODEL_NAMES
    names = tuple(part.strip() for part in value.split(",") if part.strip())
    unknown = [name for name in names if name not in MODEL_NAMES]
    if unknown or not names:
        raise ValueError(f"{ENV_PREFIX}MODELS: unknown model(s) {unknown or value!r}; known models: {', '.join(MODEL_NAMES)}")
    return names


@functools.cache
def load_config() -> BenchConfig:
    """Read the FACEDEIT_BENCH_* variables once per process. Raises ValueError naming an invalid one."""
    device = pick_device(_env("DEVICE"))
    # Devices other than CUDA get the CPU's smaller defaults.
    kind = "cuda" if device.type == "cuda" else "cpu"
    compile_flag = _env("COMPILE") or "0"
    if compile_flag not in ("0", "1"):
        raise ValueError(f"{ENV_PREFIX}COMPILE: expected 0 or 1, got {compile_flag!r}")
    return BenchConfig(
        device=device,
        models=_env_models(),
        batches=_env_ints("BATCHES", DEFAULT_BATCHES[kind]),
        rounds=_env_int("ROUNDS", DEFAULT_ROUNDS[kind], 1),
        warmup=_env_int("WARMUP", DEFAULT_WARMUP[kind], 0),
        compile=compile_flag == "1",
        out_dir=Path(_env("OUT") or "results/benchmarks"),
        crops_dir=Path(_env("CROPS") or "cache/faces"),
        photos_dir=Path(_env("PHOTOS") or SHARED_LFW),
        mtcnn_photos=_env_int("MTCNN_PHOTOS", DEFAULT_MTCNN_PHOTOS[kind], 1),
        loader_images=_env_int("LOADER_IMAGES", 1024, 1),
        peak_size=_env_int("PEAK_SIZE", 4096, 16),
    )


def device_kind() -> str:
    """Return the device type the benchmarks run on, "cpu" or "cuda". `make bench` names its JSON file by it."""
    return load_config().kind


# ---------------------------------------------------------------------------- timing


class StepTimes:
    """Milliseconds of every call of one benchmarked function, measured with BatchTimer."""

    def __init__(self, device: torch.device):
        self.timer = BatchTimer(device)
        self.ms: list[float] = []

    def wrap(self, function: Callable[[], object]) -> Callable[[], None]:
        """Return a function that times each call of `function` and returns None.

        pytest-benchmark's pedantic mode treats a value returned by `setup` as
        the target's arguments, so the wrapper never returns one.
        """

        def timed() -> None:
            self.timer.start()
            function()
            self.ms.append(self.timer.stop())

        return timed

    def measured(self, rounds: int) -> list[float]:
        """Return the last `rounds` times, leaving out pedantic mode's warm-up rounds.

        With --benchmark-disable the function runs once, and that one time is returned.
        """
        if not self.ms:
            raise RuntimeError("the benchmarked function never ran")
        return self.ms[-rounds:]


def summarize(ms: list[float], images: int) -> dict:
    """Median, min and max round time, and images/s at the median for `images` per round."""
    median = statistics.median(ms)
    return {
        "rounds": len(ms), "ms_median": median, "ms_min": min(ms), "ms_max": max(ms),
        "images_per_s": images / (median / 1000.0),
    }


@contextmanager
def skip_on_cuda_oom(case: str):
    """Turn a CUDA out-of-memory error into a pytest skip of `case`, so larger batches skip and the rest still run."""
    import pytest

    try:
        yield
    except torch.OutOfMemoryError as err:
        torch.cuda.empty_cache()
        pytest.skip(f"{case}: out of GPU memory ({str(err).splitlines()[0]})")


# ---------------------------------------------------------------------------- FLOPs and peaks


def count_flops_per_image(model: torch.nn.Module, img_size: int, device: torch.device, train: bool,
                          batch: int = 2) -> float:
    """Count the FLOPs of one forward (train=False) or forward and backward (train=True) per image.

    torch.utils.flop_counter counts matrix multiplies, convolutions and
    attention, not elementwise work, norms or the optimizer step. The counter
    has no formula for the fused CPU attention kernel, so attention runs on the
    math backend while counting. That also makes the count the same on every
    device. Batch 2 keeps BatchNorm1d working in train mode. Gradients are
    cleared afterwards.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    counter = FlopCounterMode(display=False)
    try:
        with sdpa_kernel(SDPBackend.MATH), counter:
            if train:
                model.train()
                model(images).float().sum().backward()
            else:
                model.eval()
                with torch.no_grad():
                    model(images)
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def cuda_peak(name: str) -> tuple[float, str]:
    """Return (dense bf16 peak FLOP/s, source) for a CUDA device name, or (nan, reason) when not in the table."""
    if "PCIe" in name or "NVL" in name:
        return math.nan, f"no peak on file for {name}"
    for part, peak in CUDA_BF16_PEAKS:
        if part in name:
            return peak, CUDA_PEAK_SOURCE
    return math.nan, f"no peak on file for {name}"


def measure_matmul_peak(device: torch.device, size: int, repeats: int = 5) -> float:
    """Measure the fp32 FLOP/s of a size x size torch.mm: one warm-up, then the best of `repeats`."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    timer = BatchTimer(device)
    torch.mm(a, b)
    best_ms = math.inf
    for _ in range(repeats):
        timer.start()
        torch.mm(a, b)
        best_ms = min(best_ms, timer.stop())
    return 2.0 * size**3 / (best_ms / 1000.0)


def device_peak(config: BenchConfig) -> tuple[float, str]:
    """Return (peak FLOP/s, source): the vendor's bf16 figure on CUDA, a measured fp32 matmul peak on the CPU."""
    if config.device.type == "cuda":
        return cuda_peak(torch.cuda.get_device_name(config.device))
    peak = measure_matmul_peak(config.device, config.peak_size)
    return peak, f"measured matmul peak: fp32 {config.peak_size}x{config.peak_size} torch.mm, {torch.get_num_threads()} threads"


# ---------------------------------------------------------------------------- rows and the CSV


def throughput_row(config: BenchConfig, device: torch.device, model: str, batch: int, phase: str, ms: list[float],
                   images_per_round: int, flops_per_image: float = math.nan,
                   peak: tuple[float, str] = (math.nan, ""), **extra) -> dict:
    """Build one CSV row: timing summary, FLOP/s and fraction of peak, plus `extra` columns."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of {', '.join(PHASES)}")
    row = {
        "device_kind": device.type, "device": device_name(device), "model": model, "batch": batch, "phase": phase,
        "warmup_rounds": config.warmup, **summarize(ms, images_per_round),
        "flops_per_image": flops_per_image, "peak_flops_per_s": peak[0], "peak_source": peak[1],
        "torch": torch.__version__,
    }
    row["achieved_flops_per_s"] = flops_per_image * row["images_per_s"]
    row["fraction_of_peak"] = row["achieved_flops_per_s"] / peak[0] if peak[0] > 0 else math.nan
    row.update(extra)
    return row


def json_safe(row: dict) -> dict:
    """Return `row` with NaN replaced by None and paths by strings, for pytest-benchmark's extra_info."""
    safe = {}
    for key, value in row.items():
        if isinstance(value, float) and math.isnan(value):
            value = None
        elif isinstance(value, Path):
            value = str(value)
        safe[key] = value
    return safe


def write_csv(rows: list[dict], out_dir: Path, kind: str) -> Path:
    """Write the session's rows, with the cross-row ratios, to `<out_dir>/benchmarks-<kind>.csv`."""
    from facedeit.bench_table import add_ratios

    frame = pd.DataFrame(rows)
    frame["git_commit"] = git_commit()
    frame["finished"] = now_utc()
    frame = add_ratios(frame).reindex(columns=COLUMNS)
    path = Path(out_dir) / f"benchmarks-{kind}.csv"
    write_csv_atomic(path, frame)
    return path


if __name__ == "__main__":
    print(device_kind())
