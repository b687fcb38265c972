"""The benchmark suites run and write their files, and the report's benchmark section reads them.

No test here checks a speed. The suites run once at a tiny size, and the
tests check only the files, their columns and the ratios computed from them.
"""

import json
import math
import os
import subprocess
import sys

import pandas as pd
import pytest

from facedeit.bench import COLUMNS
from facedeit.bench_table import TITLE, add_ratios, benchmark_section
from tests.conftest import REPO, SHARED_LFW

EXTRA_INFO_KEYS = {"model", "batch", "phase", "device", "images_per_s", "flops_per_image",
                   "achieved_flops_per_s", "fraction_of_peak"}


@pytest.fixture
def lfw_dirs(request):
    """(photos folder, crop cache) from the shared LFW fixtures, or None when the shared photos are missing."""
    if not SHARED_LFW.is_dir():
        return None
    return request.getfixturevalue("photos_dir"), request.getfixturevalue("crops_dir")


def test_suites_write_json_and_csv(tmp_path, lfw_dirs):
    out = tmp_path / "out"
    json_path = tmp_path / "bench.json"
    env = {
        **os.environ,
        "FACEDEIT_BENCH_DEVICE": "cpu",
        "FACEDEIT_BENCH_MODELS": "deit_tiny_ls",
        "FACEDEIT_BENCH_BATCHES": "2",
        "FACEDEIT_BENCH_ROUNDS": "1",
        "FACEDEIT_BENCH_WARMUP": "0",
        "FACEDEIT_BENCH_OUT": str(out),
        "FACEDEIT_BENCH_CROPS": str(lfw_dirs[1] if lfw_dirs else tmp_path / "no_crops"),
        "FACEDEIT_BENCH_PHOTOS": str(lfw_dirs[0] if lfw_dirs else tmp_path / "no_photos"),
        "FACEDEIT_BENCH_MTCNN_PHOTOS": "2",
        "FACEDEIT_BENCH_LOADER_IMAGES": "4",
        "FACEDEIT_BENCH_PEAK_SIZE": "256",
    }
    command = [sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", f"--benchmark-json={json_path}",
               "-p", "no:cacheprovider", "-q"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    expected_phases = {"forward", "train", "bare_train"}
    if lfw_dirs:
        expected_phases |= {"loader", "mtcnn_single", "mtcnn_batched"}

    report = json.loads(json_path.read_text())
    json_phases = set()
    for entry in report["benchmarks"]:
        assert EXTRA_INFO_KEYS <= set(entry["extra_info"]), entry["name"]
        json_phases.add(entry["extra_info"]["phase"])
    # The bare loop has no entry of its own. Its row is nested in the train entry.
    assert json_phases == expected_phases - {"bare_train"}
    train_entry = next(e for e in report["benchmarks"] if e["extra_info"]["phase"] == "train")
    assert train_entry["extra_info"]["bare_train"]["phase"] == "bare_train"

    frame = pd.read_csv(out / "benchmarks-cpu.csv")
    assert list(frame.columns) == COLUMNS
    assert set(frame["phase"]) == expected_phases
    assert len(frame) == len(expected_phases)
    assert (frame["device_kind"] == "cpu").all()
    assert frame["images_per_s"].gt(0).all()

    models = frame[frame["phase"].isin(["forward", "train", "bare_train"])]
    assert (models["model"] == "deit_tiny_ls").all()
    assert (models["batch"] == 2).all()
    assert models["flops_per_image"].gt(0).all()
    assert models["fraction_of_peak"].gt(0).all()
    assert models["peak_source"].str.startswith("measured matmul peak").all()
    forward_flops = models.loc[models["phase"] == "forward", "flops_per_image"].iloc[0]
    train_flops = models.loc[models["phase"] == "train", "flops_per_image"].iloc[0]
    # A backward pass costs about twice the forward.
    assert 2.5 < train_flops / forward_flops < 3.5

    train = frame[frame["phase"] == "train"].iloc[0]
    bare = frame[frame["phase"] == "bare_train"].iloc[0]
    assert math.isclose(train["ratio_to_bare"], train["images_per_s"] / bare["images_per_s"])
    assert train["grad_norm_ms"] > 0
    assert "get_total_norm" in train["gap_note"]
    assert train["ratio_round_min"] <= train["ratio_round_max"]
    assert 0 < train["grad_norm_share"] < 1

    if lfw_dirs:
        loader = frame[frame["phase"] == "loader"].iloc[0]
        assert loader["loader_model"] == "deit_base_ls"
        # Only deit_tiny_ls ran, so the DeiT-B ratio has nothing to compare with.
        assert math.isnan(loader["loader_to_model_ratio"])
        assert loader["fastest_model"] == "deit_tiny_ls"
        assert math.isclose(loader["loader_to_fastest_ratio"], loader["images_per_s"] / train["images_per_s"])
        batched = frame[frame["phase"] == "mtcnn_batched"].iloc[0]
        assert batched["batch"] == 2


def hand_made_rows() -> pd.DataFrame:
    device = "CPU: test, 2 threads"
    common = {"device_kind": "cpu", "device": device, "rounds": 3, "warmup_rounds": 1, "torch": "2.x",
              "git_commit": "abc", "finished": "2025-01-01T00:00:00+00:00",
              "peak_flops_per_s": 1e12, "peak_source": "measured matmul peak: test"}
    rows = [
        {"model": "resnet18", "batch": 32, "phase": "train", "images_per_s": 100.0, "ratio_to_bare": 0.99,
         "ratio_round_min": 0.97, "ratio_round_max": 1.01, "grad_norm_share": 0.002,
         "flops_per_image": 6e9, "achieved_flops_per_s": 6e11, "fraction_of_peak": 0.6},
        {"model": "resnet18", "batch": 32, "phase": "bare_train", "images_per_s": 101.0},
        {"model": "deit_tiny_ls", "batch": 32, "phase": "train", "images_per_s": 50.0, "ratio_to_bare": 0.9,
         "ratio_round_min": 0.85, "ratio_round_max": 0.95, "grad_norm_share": 0.004,
         "gap_note": "harness 640.0 ms, bare 576.0 ms per step"},
        {"model": "deit_tiny_ls", "batch": 32, "phase": "bare_train", "images_per_s": 55.5},
        {"model": "deit_tiny_ls", "batch": 64, "phase": "train", "images_per_s": 60.0},
        {"model": "deit_base_ls", "batch": 32, "phase": "train", "images_per_s": 10.0},
        {"model": "loader", "batch": 32, "phase": "loader", "images_per_s": 300.0, "loader_model": "deit_base_ls",
         "loader_workers": 1},
        {"model": "mtcnn", "batch": 1, "phase": "mtcnn_single", "images_per_s": 12.0},
    ]
    return pd.DataFrame([{**common, **row} for row in rows]).reindex(columns=COLUMNS)


def test_add_ratios_compares_same_device_batch_phase():
    frame = add_ratios(hand_made_rows()).set_index(["model", "batch", "phase"])
    assert frame.loc[("deit_tiny_ls", 32, "train"), "ratio_to_resnet18"] == pytest.approx(0.5)
    assert frame.loc[("deit_tiny_ls", 32, "bare_train"), "ratio_to_resnet18"] == pytest.approx(55.5 / 101.0)
    # No resnet18 row at batch 64.
    assert math.isnan(frame.loc[("deit_tiny_ls", 64, "train"), "ratio_to_resnet18"])
    assert math.isnan(frame.loc[("mtcnn", 1, "mtcnn_single"), "ratio_to_resnet18"])

    loader = frame.loc[("loader", 32, "loader")]
    assert loader["model_train_images_per_s"] == pytest.approx(10.0)
    assert loader["loader_to_model_ratio"] == pytest.approx(30.0)
    assert loader["fastest_model"] == "resnet18"
    assert loader["loader_to_fastest_ratio"] == pytest.approx(3.0)


def markdown_rows(text: str) -> list[dict]:
    """Parse the first Markdown table in `text` into one dict of stripped cells per row."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def test_benchmark_section_from_csv(tmp_path):
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    hand_made_rows().to_csv(folder / "benchmarks-cpu.csv", index=False)

    text = benchmark_section(tmp_path)

    assert text.startswith(TITLE)
    assert "make bench" in text
    table = markdown_rows(text)
    for column in ("device", "model", "batch", "phase", "images/s", "vs resnet18", "harness / bare",
                   "loader / model train", "GFLOP/image", "achieved TFLOP/s", "fraction of peak"):
        assert column in table[0]
    assert len(table) == len(hand_made_rows())
    cells = {(row["model"], row["batch"], row["phase"]): row for row in table}
    assert cells[("deit_tiny_ls", "32", "train")]["vs resnet18"] == "0.50"
    assert cells[("deit_tiny_ls", "32", "train")]["harness / bare"] == "0.900"
    assert cells[("resnet18", "32", "train")]["GFLOP/image"] == "6.00"
    assert cells[("resnet18", "32", "train")]["achieved TFLOP/s"] == "0.600"
    assert cells[("resnet18", "32", "train")]["fraction of peak"] == "60.0%"
    assert cells[("loader", "32", "loader")]["loader / model train"] == "30.00"
    assert cells[("mtcnn", "1", "mtcnn_single")]["vs resnet18"] == ""
    # The train row below the 0.98 target is listed with its note, and resnet18 at 0.99 is not.
    assert "deit_tiny_ls at batch 32 on CPU: test, 2 threads: harness 640.0 ms" in text
    assert "resnet18 at batch 32 on" not in text
    assert "measured matmul peak: test" in text
    assert "at most 0.4% of a bare step" in text
    assert "Per-round ratios range from 0.850 to 1.010" in text


def test_benchmark_section_without_csv_is_empty(tmp_path):
    assert benchmark_section(tmp_path) == ""
    (tmp_path / "benchmarks").mkdir()
    assert benchmark_section(tmp_path) == ""
