"""DistributedDataParallel and gradient accumulation on the CPU with the gloo backend."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from facedeit.data import device_batch_size
from facedeit.recipes import load_recipe
from facedeit.train import train_recipe
from tests.conftest import REPO, write_recipe

# No random augmentation or dropout, so every set-up gets the same pixels and
# differs only in how the batch is split. The batch must divide the train set:
# DistributedSampler pads an indivisible set with repeated images, which
# changes the last batch of each epoch.
PLAIN_RECIPE = """\
model: {name: deit_tiny_ls, img_size: 160}
epochs: 2
batch_size: 4
optimizer: {name: adamw, lr: 1.0e-3, weight_decay: 0.05}
schedule: {name: cosine, warmup_epochs: 0.5, warmup_lr: 1.0e-6, min_lr: 1.0e-5}
augment: {hflip: 0.0}
"""
# Summing the gradient in another order changes the last bits of float32
# numbers; over the few updates here the losses stay this close.
LOSS_TOLERANCE = 1e-4


def _torchrun(args, tmp_path, processes=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "facedeit", *args]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def _losses(results, run="plain-full-seed0"):
    return pd.read_csv(results / "runs" / run / "steps.csv")["loss"].tolist()


@pytest.fixture
def four_people_crops(crops_dir, tmp_path):
    """The fixture's crops without its last person: 4 people x 5 train images."""
    split = pd.read_csv(crops_dir / "split.csv")
    last = split["person"].max()
    folder = tmp_path / "crops4"
    folder.mkdir()
    (folder / "crops").symlink_to(crops_dir / "crops")
    split[split["person"] != last].to_csv(folder / "split.csv", index=False)
    return folder


def test_ddp_and_accumulation_match_batch(four_people_crops, tmp_path):
    crops_dir = four_people_crops
    recipe_file = write_recipe(tmp_path / "plain.yaml", PLAIN_RECIPE)
    recipe = load_recipe(recipe_file)
    train_recipe(recipe, crops_dir, tmp_path / "single", profile="full", progress=False)
    train_recipe(recipe, crops_dir, tmp_path / "accum", profile="full", progress=False, accum_steps=2)
    result = _torchrun(["train", str(recipe_file), "--crops", str(crops_dir), "--results", str(tmp_path / "ddp"),
                        "--profile", "full", "--device", "cpu", "--no-progress"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    single = _losses(tmp_path / "single")
    assert len(single) >= 4
    assert _losses(tmp_path / "accum") == pytest.approx(single, abs=LOSS_TOLERANCE)
    assert _losses(tmp_path / "ddp") == pytest.approx(single, abs=LOSS_TOLERANCE)

    info = json.loads((tmp_path / "ddp/runs/plain-full-seed0/run.json").read_text())
    assert info["distributed"] == {"world_size": 2, "accum_steps": 1, "device_batch_size": 2}
    steps = pd.read_csv(tmp_path / "ddp/runs/plain-full-seed0/steps.csv")
    assert steps["images"].max() == 4  # counted over both processes
    epochs_single = pd.read_csv(tmp_path / "single/runs/plain-full-seed0/epochs.csv")
    epochs_ddp = pd.read_csv(tmp_path / "ddp/runs/plain-full-seed0/epochs.csv")
    # Evaluation is gathered over both ranks: every val image is counted once.
    assert epochs_ddp["val_images"].tolist() == epochs_single["val_images"].tolist()
    assert epochs_ddp["val_top1"].tolist() == pytest.approx(epochs_single["val_top1"].tolist(), abs=1e-6)

    # Resume under torchrun: drop the last epoch as if the run had stopped before it.
    run_dir = tmp_path / "ddp/runs/plain-full-seed0"
    (run_dir / "checkpoints" / "epoch_001.pt").unlink()
    info["status"] = "stopped"
    (run_dir / "run.json").write_text(json.dumps(info))
    result = _torchrun(["train", str(recipe_file), "--crops", str(crops_dir), "--results", str(tmp_path / "ddp"),
                        "--profile", "full", "--device", "cpu", "--no-progress", "--resume"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _losses(tmp_path / "ddp") == pytest.approx(single, abs=LOSS_TOLERANCE)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"


@pytest.mark.parametrize("batch, world, accum, expected", [(1024, 8, 1, 128), (1024, 1, 4, 1024), (64, 2, 2, 32)])
def test_device_batch_size(batch, world, accum, expected):
    assert device_batch_size(batch, world, accum) == expected


def test_indivisible_batch_is_rejected():
    with pytest.raises(ValueError, match="batch_size 30 is not divisible by 4 processes x 2 accumulation steps"):
        device_batch_size(30, 4, 2)
