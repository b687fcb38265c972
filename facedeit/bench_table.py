"""The benchmark section of REPORT.md, built from the CSVs that `make bench` writes to results/benchmarks/."""

import math
from pathlib import Path

import pandas as pd

BASELINE_MODEL = "resnet18"
MODEL_PHASES = ("forward", "train", "bare_train")
PHASE_ORDER = ("forward", "train", "bare_train", "loader", "mtcnn_single", "mtcnn_batched")
# The harness's train step should run at this fraction of the bare loop's images/s or better.
BARE_RATIO_TARGET = 0.98

# Columns the section reads besides device, model, batch, phase and images_per_s.
REQUIRED_COLUMNS = (
    "ratio_to_bare", "ratio_round_min", "ratio_round_max", "grad_norm_share", "gap_note", "flops_per_image",
    "achieved_flops_per_s", "peak_flops_per_s", "peak_source", "fraction_of_peak", "loader_workers", "loader_model",
    "rounds", "warmup_rounds", "torch", "git_commit", "finished",
)

TITLE = "## Benchmarks (pytest-benchmark)"
INTRO = """\
Throughput measured by `make bench`, which runs `python -m pytest benchmarks --benchmark-only` on the \
device present and writes pytest-benchmark's JSON and one CSV per device kind to `results/benchmarks/`. \
On a GPU machine the same command gives the GPU table. \
Images/s is the batch divided by the median time of one call after the warm-up rounds. \
Calls are timed as training times them: CUDA events and a synchronize on a GPU, perf_counter on the CPU. \
On CUDA the models run under bf16 autocast and the CNNs in channels_last. The CPU runs fp32.

`train` is facedeit's `train_step` (forward, backward, gradient norm, AdamW step). \
`bare_train` is a plain PyTorch step on a copy of the same model, with the same AdamW parameter groups, batch and device. \
The two alternate round by round in one benchmark, so both see the same machine load. \
FLOPs/image counts the matrix multiplies, convolutions and attention of one forward (forward rows) \
or one forward and backward (train rows) with `torch.utils.flop_counter`. \
Elementwise work and the optimizer step are not counted. \
`loader` is the crop-cache DataLoader with the DeiT-B recipe's train transforms \
(RandAugment, random erasing, then mixup or CutMix on the device). \
The MTCNN rows time facenet-pytorch's detector on decoded LFW photos, one photo per call or all of a round in one call.
"""


def add_ratios(frame: pd.DataFrame) -> pd.DataFrame:
    """Return a copy of the benchmark rows with the ratios that compare rows.

    ratio_to_resnet18: images/s over resnet18's on the same device, batch and
    phase (model phases only). For loader rows, model_train_images_per_s and
    loader_to_model_ratio compare with the harness train step of the loader's
    recipe model (`loader_model`), and fastest_model and loader_to_fastest_ratio
    with the fastest train step measured on the same device and batch.
    A ratio without a row to compare with is NaN.
    """
    frame = frame.copy()
    keys = ["device", "batch", "phase"]
    model_rows = frame["phase"].isin(MODEL_PHASES)
    baseline = frame[model_rows & (frame["model"] == BASELINE_MODEL)].drop_duplicates(keys, keep="last")
    baseline = baseline.set_index(keys)["images_per_s"]
    frame["ratio_to_resnet18"] = [
        row.images_per_s / baseline.get((row.device, row.batch, row.phase), math.nan) if is_model else math.nan
        for row, is_model in zip(frame.itertuples(), model_rows)
    ]

    frame["model_train_images_per_s"] = math.nan
    frame["loader_to_model_ratio"] = math.nan
    frame["fastest_model"] = pd.Series([None] * len(frame), index=frame.index, dtype=object)
    frame["loader_to_fastest_ratio"] = math.nan
    if "loader_model" not in frame:
        frame["loader_model"] = None
    train = frame[frame["phase"] == "train"]
    for index, row in frame[frame["phase"] == "loader"].iterrows():
        same = train[(train["device"] == row["device"]) & (train["batch"] == row["batch"])]
        if same.empty:
            continue
        recipe_model = same[same["model"] == row["loader_model"]]
        if not recipe_model.empty:
            model_rate = recipe_model["images_per_s"].iloc[-1]
            frame.loc[index, "model_train_images_per_s"] = model_rate
            frame.loc[index, "loader_to_model_ratio"] = row["images_per_s"] / model_rate
        fastest = same.loc[same["images_per_s"].idxmax()]
        frame.loc[index, "fastest_model"] = fastest["model"]
        frame.loc[index, "loader_to_fastest_ratio"] = row["images_per_s"] / fastest["images_per_s"]
    return frame


def _number(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return format(value, fmt)


def _sorted_rows(frame: pd.DataFrame) -> pd.DataFrame:
    from facedeit.models import MODEL_NAMES

    model_rank = {name: i for i, name in enumerate(MODEL_NAMES)}
    phase_rank = {name: i for i, name in enumerate(PHASE_ORDER)}
    return frame.assign(
        _phase=frame["phase"].map(phase_rank).fillna(len(phase_rank)),
        _model=frame["model"].map(model_rank).fillna(len(model_rank)),
    ).sort_values(["device", "_phase", "_model", "batch"]).drop(columns=["_phase", "_model"])


def throughput_markdown(frame: pd.DataFrame) -> str:
    """Render one table row per benchmark row, with FLOPs in GFLOP and FLOP/s in TFLOP/s."""
    table = pd.DataFrame({
        "device": frame["device"],
        "model": frame["model"],
        "batch": frame["batch"].astype(int),
        "phase": frame["phase"],
        "images/s": [_number(v, ".1f") for v in frame["images_per_s"]],
        f"vs {BASELINE_MODEL}": [_number(v, ".2f") for v in frame["ratio_to_resnet18"]],
        "harness / bare": [_number(v, ".3f") for v in frame["ratio_to_bare"]],
        "loader / model train": [_number(v, ".2f") for v in frame["loader_to_model_ratio"]],
        "GFLOP/image": [_number(v / 1e9, ".2f") for v in frame["flops_per_image"]],
        "achieved TFLOP/s": [_number(v / 1e12, ".3f") for v in frame["achieved_flops_per_s"]],
        "fraction of peak": [_number(v, ".1%") for v in frame["fraction_of_peak"]],
    })
    # disable_numparse keeps tabulate from re-formatting the already formatted numbers.
    align = ["left", "left", "right", "left"] + ["right"] * (len(table.columns) - 4)
    return table.to_markdown(index=False, disable_numparse=True, colalign=align) + "\n"


def _device_notes(frame: pd.DataFrame) -> list[str]:
    lines = []
    for device, rows in frame.groupby("device", sort=True):
        peaks = rows.dropna(subset=["peak_flops_per_s"])
        if peaks.empty:
            peak = "no peak figure"
        else:
            first = peaks.iloc[0]
            peak = f"peak {first['peak_flops_per_s'] / 1e12:.3f} TFLOP/s ({first['peak_source']})"
        model_rows = rows[rows["phase"].isin(MODEL_PHASES)]
        timing = rows if model_rows.empty else model_rows
        # Rows of one device can come from more than one pytest session.
        finished = sorted(rows["finished"].dropna().astype(str).unique())
        when = finished[0] if len(finished) == 1 else f"{finished[0]} to {finished[-1]}"
        commits = ", ".join(sorted(rows["git_commit"].dropna().astype(str).unique()))
        lines.append(
            f"- {device}: {peak}. Timed rounds per benchmark: {int(timing['rounds'].max())}, after "
            f"{int(timing['warmup_rounds'].max())} warm-up. torch {rows['torch'].iloc[0]}, "
            f"commit {commits}, finished {when}."
        )
    return lines


def _bare_notes(frame: pd.DataFrame) -> list[str]:
    train = frame[(frame["phase"] == "train") & frame["ratio_to_bare"].notna()]
    if train.empty:
        return []
    ratios = train["ratio_to_bare"]
    lines = [
        f"Harness / bare loop over {len(train)} train benchmarks: min {ratios.min():.3f}, "
        f"median {ratios.median():.3f}, max {ratios.max():.3f} (target: {BARE_RATIO_TARGET} or more). "
        f"The gradient-norm pass that train_step adds to the bare step takes at most "
        f"{train['grad_norm_share'].max():.1%} of a bare step when timed alone. "
        f"Per-round ratios range from {train['ratio_round_min'].min():.3f} to {train['ratio_round_max'].max():.3f}, "
        f"which shows how much one comparison varies from round to round on this machine."
    ]
    for row in train[ratios < BARE_RATIO_TARGET].itertuples():
        lines.append(f"- {row.model} at batch {row.batch} on {row.device}: {row.gap_note}")
    return lines


def _loader_notes(frame: pd.DataFrame) -> list[str]:
    lines = []
    for row in frame[frame["phase"] == "loader"].itertuples():
        text = (f"- Loader at batch {row.batch} on {row.device}, worker processes: {int(row.loader_workers)}. "
                f"It delivers {row.images_per_s:.1f} images/s")
        if not math.isnan(row.loader_to_model_ratio):
            text += (f", {row.loader_to_model_ratio:.2f} times the {row.loader_model} train step "
                     f"({row.model_train_images_per_s:.1f} images/s)")
        if isinstance(row.fastest_model, str):
            text += (f" and {row.loader_to_fastest_ratio:.2f} times the fastest train step measured "
                     f"({row.fastest_model})")
        lines.append(text + ". Below 1, the loader is the bottleneck.")
    return lines


def benchmark_section(results_dir: Path) -> str:
    """Return the Markdown benchmark section built from `<results_dir>/benchmarks/*.csv`, or "" without a CSV."""
    paths = sorted((Path(results_dir) / "benchmarks").glob("*.csv"))
    frames = [pd.read_csv(path) for path in paths]
    frames = [frame for frame in frames if not frame.empty]
    if not frames:
        return ""
    frame = pd.concat(frames, ignore_index=True)
    # A CSV from an older version of the suites may lack the newer columns.
    frame = frame.reindex(columns=[*frame.columns, *(c for c in REQUIRED_COLUMNS if c not in frame.columns)])
    frame = _sorted_rows(add_ratios(frame))

    parts = [TITLE, "", INTRO, throughput_markdown(frame)]
    parts += _device_notes(frame) + [""]
    bare = _bare_notes(frame)
    if bare:
        parts += bare + [""]
    loader = _loader_notes(frame)
    if loader:
        parts += loader + [""]
    return "\n".join(parts)
