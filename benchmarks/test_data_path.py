"""Images/s of the training data path: crop cache -> DeiT-B train transforms -> batches on the device -> mixup.

The loader is the one training builds (facedeit.data.build_loaders) for the
DeiT-B recipe under the `full` profile, so it has that profile's worker count,
with only the batch size changed. The CSV compares each loader row with the
train-step rows of the same session (facedeit.bench_table.add_ratios).
"""

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from facedeit import bench
from facedeit.data import build_loaders, build_mixup, read_split
from facedeit.recipes import load_recipe, resolve

CONFIG = bench.load_config()
# RandomResizedCrop, flip, RandAugment m9, random erasing 0.25, mixup 0.8 / CutMix 1.0, repeated augmentation.
LOADER_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "deit_b_paper.yaml"


def endless_batches(loaders, device: torch.device):
    """Yield training batches on `device` epoch after epoch, as train_recipe's loop receives them.

    A new epoch starts new worker processes (the loaders do not keep them), and
    that start-up is part of the measured time, as it is in training.
    """
    for epoch in range(10**9):
        loaders.set_epoch(0, epoch)
        for images, targets in loaders.train:
            yield images.to(device, non_blocking=True), targets.to(device, non_blocking=True)


@pytest.mark.parametrize("batch", CONFIG.batches, ids=[f"b{b}" for b in CONFIG.batches])
def test_loader(benchmark, record, bench_config, batch):
    crops_dir = bench_config.crops_dir
    if not (crops_dir / "split.csv").is_file():
        pytest.skip(f"{crops_dir / 'split.csv'} not found; run `make crop` or set FACEDEIT_BENCH_CROPS")
    device = bench_config.device
    benchmark.group = f"loader b{batch}"

    recipe = load_recipe(LOADER_RECIPE)
    if recipe.mixup_active and batch % 2:
        pytest.skip(f"loader at batch {batch}: mixup and CutMix need an even batch")
    run = dataclasses.replace(resolve(recipe, "full"), batch_size=batch)
    data = read_split(crops_dir)
    try:
        loaders = build_loaders(data, run)
    except ValueError as err:
        pytest.skip(f"loader at batch {batch}: {err}")
    mixup = build_mixup(run, data.num_classes)
    batches_per_round = max(1, math.ceil(bench_config.loader_images / batch))
    stream = endless_batches(loaders, device)

    def next_batches():
        for _ in range(batches_per_round):
            images, targets = next(stream)
            if mixup is not None:
                mixup(images, targets)

    times = bench.StepTimes(device)
    try:
        benchmark.pedantic(times.wrap(next_batches), rounds=bench_config.rounds, warmup_rounds=bench_config.warmup)
    finally:
        # Closing the generator drops the DataLoader iterator, which stops its worker processes.
        stream.close()

    # drop_last is on under mixup, so every batch is full.
    record(bench.throughput_row(
        bench_config, device, "loader", batch, "loader", times.measured(bench_config.rounds),
        batches_per_round * batch,
        loader_workers=run.num_workers, loader_model=recipe.model.name, img_size=recipe.model.img_size,
        note=(f"{LOADER_RECIPE.stem} train transforms, {batches_per_round} batches per round, "
              f"{len(data.train)} train crops"),
    ))
