"""Datasets over the face crops, transforms, samplers, mixup and loaders (timm's parts)."""

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from facedeit.recipes import Resolved

INTERPOLATION = "bicubic"


class CropDataset(Dataset):
    """(image, label) pairs from the rows of split.csv; paths are relative to the crop folder."""

    def __init__(self, crops_dir: Path, rows: pd.DataFrame, transform=None):
        self.crops_dir = Path(crops_dir)
        self.paths = list(rows["crop"])
        self.labels = [int(v) for v in rows["label"]]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        with Image.open(self.crops_dir / self.paths[index]) as img:
            img = img.convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, self.labels[index]


@dataclass
class FaceData:
    """The split after a profile's limits, with class names in label order."""

    crops_dir: Path
    train: pd.DataFrame
    val: pd.DataFrame
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def read_split(crops_dir: Path, max_people: int | None = None, max_images_per_person: int | None = None) -> FaceData:
    """Read `<crops_dir>/split.csv`, keep at most `max_people` people (the first by name)
    and `max_images_per_person` images each, and relabel the kept people 0..n-1."""
    split_file = Path(crops_dir) / "split.csv"
    if not split_file.is_file():
        raise FileNotFoundError(f"{split_file}: not found; run `facedeit crop` first")
    try:
        split = pd.read_csv(split_file)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"{split_file}: unreadable CSV ({err}); run `facedeit crop` again") from None
    missing = {"crop", "person", "label", "split"} - set(split.columns)
    if missing:
        raise ValueError(f"{split_file}: missing columns {sorted(missing)}; run `facedeit crop` again")
    people = sorted(split["person"].unique())
    if max_people is not None:
        people = people[:max_people]
    split = split[split["person"].isin(people)].copy()
    split["label"] = split["person"].map({p: i for i, p in enumerate(people)})
    if max_images_per_person is not None:
        # Keep the val share of the full split: cap train and val images in proportion.
        val_share = (split["split"] == "val").mean()
        n_val = max(1, round(val_share * max_images_per_person))
        caps = {"train": max_images_per_person - n_val, "val": n_val}
        rank = split.groupby(["person", "split"]).cumcount()
        split = split[rank < split["split"].map(caps)]
    train = split[split["split"] == "train"].reset_index(drop=True)
    val = split[split["split"] == "val"].reset_index(drop=True)
    return FaceData(Path(crops_dir), train, val, people)


def build_transforms(run: Resolved):
    """Return (train, eval) transforms from timm's create_transform.

    Train: RandomResizedCrop over `crop_scale`, flip, RandAugment, colour
    jitter and random erasing as the recipe sets them. Eval: the whole crop,
    resized and normalised.
    """
    from timm.data import create_transform

    aug = run.recipe.augment
    size = run.recipe.model.img_size
    train = create_transform(
        input_size=size,
        is_training=True,
        scale=aug.crop_scale,
        ratio=(3 / 4, 4 / 3) if aug.crop_scale != (1.0, 1.0) else (1.0, 1.0),
        hflip=aug.hflip,
        # timm turns colour jitter off whenever RandAugment is on, as deit does.
        color_jitter=aug.color_jitter or None,
        auto_augment=aug.rand_augment,
        interpolation=INTERPOLATION,
        re_prob=aug.random_erasing,
        re_mode="pixel",
        re_count=1,
    )
    evaluate = create_transform(input_size=size, is_training=False, interpolation=INTERPOLATION, crop_pct=1.0)
    return train, evaluate


def build_train_sampler(dataset: Dataset, run: Resolved, num_replicas: int = 1, rank: int = 0):
    """Return the shuffling train sampler for one rank of `num_replicas`.

    timm's RepeatAugSampler when the recipe repeats augmentations, else
    torch's DistributedSampler, also on a single process: with one sampler for
    every world size, the ranks of a multi-process run split exactly the batch
    a single process would draw. Unlike deit's RASampler, repeated augmentation
    stays on with one device, and `selected_round=0` keeps timm from rounding
    the epoch down to a multiple of 256 images, which would leave a small face
    data set with no samples at all.
    """
    from timm.data.distributed_sampler import RepeatAugSampler
    from torch.utils.data import DistributedSampler

    aug = run.recipe.augment
    if aug.repeated_aug <= 1:
        # The shuffle seed is passed through set_epoch, as for RepeatAugSampler.
        return DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=0)
    if aug.repeated_aug_epoch == "dataset":
        # An epoch keeps the data set's length: about len/repeats distinct images, each `repeats` times.
        selected_ratio = num_replicas
    else:
        # An epoch shows every image `repeats` times.
        selected_ratio = num_replicas / aug.repeated_aug
    return RepeatAugSampler(
        dataset, num_replicas=num_replicas, rank=rank, shuffle=True,
        num_repeats=aug.repeated_aug, selected_round=0, selected_ratio=selected_ratio,
    )


def build_mixup(run: Resolved, num_classes: int):
    """Return timm's Mixup for the recipe, or None when mixup and cutmix are both off."""
    from timm.data import Mixup

    aug = run.recipe.augment
    if not run.recipe.mixup_active:
        return None
    return Mixup(
        mixup_alpha=aug.mixup,
        cutmix_alpha=aug.cutmix,
        prob=1.0,
        switch_prob=aug.mixup_switch_prob,
        mode="batch",
        label_smoothing=run.recipe.label_smoothing,
        num_classes=num_classes,
    )


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    sampler: object
    generator: torch.Generator
    rank: int = 0

    def set_epoch(self, seed: int, epoch: int) -> None:
        """Seed the shuffle for (seed, epoch), so a resumed run draws the same batches."""
        # Worker seeds differ per rank; the shuffle is shared, so the ranks split one permutation.
        self.generator.manual_seed(seed * 100_003 + epoch + 7_919 * self.rank)
        # Both samplers shuffle with the number given here, so the run seed is folded in.
        self.sampler.set_epoch(seed * 100_003 + epoch)


def device_batch_size(batch_size: int, world_size: int, accum_steps: int) -> int:
    """Return the images one rank loads per update; `batch_size` is the global batch."""
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be at least 1, got {accum_steps}")
    if batch_size % (world_size * accum_steps):
        raise ValueError(
            f"batch_size {batch_size} is not divisible by {world_size} processes x {accum_steps} "
            "accumulation steps; pick a batch, process count or --accum-steps that divides it"
        )
    return batch_size // world_size


def build_loaders(data: FaceData, run: Resolved, num_replicas: int = 1, rank: int = 0,
                  accum_steps: int = 1) -> Loaders:
    """Build the train and val loaders of one rank.

    The recipe's batch is the global batch: each of `num_replicas` ranks loads
    batch / num_replicas images per update and splits them into `accum_steps`
    micro-batches. Val images are dealt out to the ranks without padding.
    """
    batch = device_batch_size(run.batch_size, num_replicas, accum_steps)
    train_tf, eval_tf = build_transforms(run)
    train_set = CropDataset(data.crops_dir, data.train, train_tf)
    val_set = CropDataset(data.crops_dir, data.val, eval_tf)
    sampler = build_train_sampler(train_set, run, num_replicas, rank)
    generator = torch.Generator()
    # Mixup pairs the batch with its reverse, so it needs an even batch, and the
    # short last batch is dropped. Without mixup the short last batch is kept.
    drop_last = run.recipe.mixup_active
    if drop_last and batch % 2:
        raise ValueError(f"mixup needs an even batch on each process, got {batch}")
    samples = len(sampler)
    if drop_last and samples < batch:
        raise ValueError(
            f"batch_size {batch} is larger than the {samples} training images per epoch; "
            "mixup needs at least one full batch"
        )
    if not drop_last and samples == 0:
        raise ValueError("no training images")
    workers = run.num_workers
    train = DataLoader(
        train_set, batch_size=batch, sampler=sampler,
        drop_last=drop_last, num_workers=workers, generator=generator,
        persistent_workers=False, pin_memory=torch.cuda.is_available(),
    )
    if num_replicas > 1:
        val_set = Subset(val_set, range(rank, len(val_set), num_replicas))
    val = DataLoader(val_set, batch_size=max(batch, 64), shuffle=False, num_workers=workers,
                     pin_memory=torch.cuda.is_available())
    return Loaders(train, val, sampler, generator, rank)

