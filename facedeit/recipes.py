"""Training recipes: YAML files -> validated, frozen dataclasses, plus profiles.

A recipe describes the real run. A profile (`smoke`, `quick`, `full`) scales
it for a smaller machine without editing the file. `resolve` is the one place
that computes derived values, such as the scaled lr and warmup, and it records
every value a profile changed.
"""

import copy
import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from facedeit.models import DROP_PATH_MODES, MODEL_NAMES


# timm's RandAugment config: "rand" then dash-separated settings such as m9, n2, mstd0.5, inc1.
RAND_AUGMENT = re.compile(r"rand(-(m|n|mstd|mmax|p|inc|w)\d+(\.\d+)?)*")


class RecipeError(ValueError):
    """A recipe file that cannot be loaded; the message names the file and the key."""


@dataclass(frozen=True)
class ModelConfig:
    name: str
    img_size: int = 160
    dropout: float = 0.0
    drop_path_rate: float = 0.0
    drop_path_mode: str = "constant"
    checkpoint: str | None = None


@dataclass(frozen=True)
class LrRule:
    """Learning rate `base`, scaled linearly with the global batch when `per_batch` is set:
    lr = base * batch_size / per_batch."""

    base: float
    per_batch: int | None = None

    def lr_for(self, batch_size: int) -> float:
        if self.per_batch is None:
            return self.base
        return self.base * batch_size / self.per_batch


@dataclass(frozen=True)
class OptimizerConfig:
    name: str
    lr: LrRule
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9
    nesterov: bool = False
    # No weight decay on biases, norm weights, the position embedding and the cls token.
    no_decay_bias_norm: bool = True


@dataclass(frozen=True)
class ScheduleConfig:
    name: str
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-6
    min_lr: float = 0.0
    step_epochs: float | None = None
    gamma: float = 0.1


@dataclass(frozen=True)
class AugmentConfig:
    hflip: float = 0.5
    # RandomResizedCrop area range; (1.0, 1.0) keeps the whole crop.
    crop_scale: tuple[float, float] = (1.0, 1.0)
    color_jitter: float = 0.0
    rand_augment: str | None = None
    random_erasing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_switch_prob: float = 0.5
    repeated_aug: int = 1
    # "dataset": an epoch keeps the data set's length, as deit's RASampler does;
    # "repeats": an epoch shows every image `repeated_aug` times.
    repeated_aug_epoch: str = "dataset"


@dataclass(frozen=True)
class Recipe:
    name: str
    model: ModelConfig
    epochs: int
    batch_size: int
    optimizer: OptimizerConfig
    schedule: ScheduleConfig
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    label_smoothing: float = 0.0
    clip_grad: float | None = None
    description: str = ""
    source: str = ""

    @property
    def mixup_active(self) -> bool:
        return self.augment.mixup > 0 or self.augment.cutmix > 0


# Allowed values and ranges, keyed by dotted path. Ranges are inclusive.
CHOICES = {
    "model.name": MODEL_NAMES,
    "model.drop_path_mode": DROP_PATH_MODES,
    "optimizer.name": ("adamw", "sgd"),
    "schedule.name": ("cosine", "step", "constant"),
    "augment.repeated_aug_epoch": ("dataset", "repeats"),
}
PROBABILITIES = {
    "model.dropout", "model.drop_path_rate", "augment.hflip", "augment.random_erasing",
    "augment.mixup_switch_prob", "label_smoothing", "augment.crop_scale",
}
# Ranges that include 0 but not 1.
BELOW_ONE = {"optimizer.betas"}
POSITIVE = {
    "model.img_size", "epochs", "batch_size", "optimizer.lr.base", "optimizer.lr.per_batch",
    "optimizer.eps", "schedule.step_epochs", "clip_grad", "augment.repeated_aug",
}
NON_NEGATIVE = {
    "optimizer.weight_decay", "optimizer.momentum", "schedule.warmup_epochs", "schedule.warmup_lr",
    "schedule.min_lr", "schedule.gamma", "augment.color_jitter", "augment.mixup", "augment.cutmix",
}


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key repeated in one mapping, which PyYAML would let the last one win."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: Path, kind: str) -> dict:
    """Parse YAML file `path`, which must contain a mapping; raise RecipeError naming the file otherwise.

    `kind` names the file in messages ("recipe", "plan", "criteria").
    """
    if path.is_dir():
        raise RecipeError(f"{path}: is a folder, not a {kind} file")
    if not path.is_file():
        raise RecipeError(f"{path}: {kind} file not found")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path}: cannot read the {kind} file: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise RecipeError(f"{path}: invalid YAML{where}: {getattr(err, 'problem', None) or str(err).splitlines()[0]}") from err
    if raw is None:
        raise RecipeError(f"{path}: the {kind} file is empty")
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping of {kind} keys, got {type(raw).__name__}")
    return raw


def load_recipe(path: str | Path, overrides: dict | None = None, variant: str | None = None) -> Recipe:
    """Load and validate one recipe file; raise RecipeError naming the file and key.

    `overrides` maps dotted keys (`augment.mixup`, or a whole section such as
    `schedule`) to the values that replace the file's. The result is the
    recipe `<file stem>.<variant>`, checked like any recipe file.
    """
    path = Path(path)
    raw = read_yaml_mapping(path, "recipe")
    if "name" in raw:
        raise RecipeError(f"{path}: name: not a recipe key; the file name ({path.stem}) is the recipe name")
    name = path.stem
    if overrides:
        if not variant:
            raise RecipeError(f"{path}: a recipe with overrides needs a variant name")
        raw = apply_overrides(raw, overrides, path)
        name = f"{path.stem}.{variant}"
    try:
        recipe = _build(Recipe, {**raw, "name": name}, "")
        _check_consistency(recipe)
    except RecipeError as err:
        raise RecipeError(f"{path}: {err}") from None
    return recipe


def apply_overrides(raw: dict, overrides: dict, path: Path) -> dict:
    """Return a copy of recipe mapping `raw` with each dotted key in `overrides` set."""
    out = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        *parents, leaf = str(dotted).split(".")
        node = out
        for i, part in enumerate(parents):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                # `optimizer.lr: 0.003` is short for `optimizer.lr: {base: 0.003}`.
                if ".".join(parents[: i + 1]) != "optimizer.lr":
                    raise RecipeError(f"{path}: {dotted}: {'.'.join(parents[: i + 1])} is not a section")
                child = node[part] = {"base": child}
            node = child
        node[leaf] = copy.deepcopy(value)
    return out


def _build(cls, raw, prefix):
    """Build dataclass `cls` from mapping `raw`, rejecting unknown keys and bad values by name."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{prefix.rstrip('.')}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        allowed = sorted(set(fields) - ({"name"} if cls is Recipe else set()))
        raise RecipeError(f"{prefix}{unknown[0]}: unknown key (allowed: {', '.join(allowed)})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecipeError(f"{key}: missing required key")
            continue
        values[name] = _convert(hints[name], raw[name], key)
        _check_value(key, values[name])
    return cls(**values)


def _convert(hint, value, key):
    """Convert a YAML value to the annotated type, or raise RecipeError naming the key."""
    if dataclasses.is_dataclass(hint):
        if hint is LrRule and not isinstance(value, dict):
            # `lr: 0.003` is short for `lr: {base: 0.003}`.
            value = {"base": value}
        return _build(hint, value, key + ".")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _convert(options[0], value, key)
    if origin is tuple:
        item_types = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(item_types):
            raise RecipeError(f"{key}: expected a list of {len(item_types)} numbers, got {value!r}")
        return tuple(_convert(t, v, key) for t, v in zip(item_types, value))
    if hint is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        # PyYAML reads `3e-3` (no dot) as a string, so numeric strings are accepted.
        if isinstance(value, bool):
            raise RecipeError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise RecipeError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise RecipeError(f"{key}: expected a finite number, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise RecipeError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported recipe field type {hint} at {key}")


def _check_value(key, value):
    if value is None or dataclasses.is_dataclass(value):
        return
    if key in CHOICES and value not in CHOICES[key]:
        raise RecipeError(f"{key}: invalid value {value!r} (allowed: {', '.join(CHOICES[key])})")
    numbers = value if isinstance(value, tuple) else (value,)
    for number in numbers:
        if key in PROBABILITIES and not 0.0 <= number <= 1.0:
            raise RecipeError(f"{key}: {value!r} is outside [0, 1]")
        if key in BELOW_ONE and not 0.0 <= number < 1.0:
            raise RecipeError(f"{key}: {value!r} is outside [0, 1)")
        if key in POSITIVE and not number > 0:
            raise RecipeError(f"{key}: {value!r} must be greater than 0")
        if key in NON_NEGATIVE and not number >= 0:
            raise RecipeError(f"{key}: {value!r} must not be negative")


def _check_consistency(recipe: Recipe) -> None:
    """Check rules that involve more than one key."""
    if recipe.model.img_size % 16 and recipe.model.name.startswith("deit"):
        raise RecipeError(f"model.img_size: {recipe.model.img_size} is not a multiple of the patch size 16")
    if recipe.mixup_active and recipe.batch_size % 2:
        raise RecipeError(f"batch_size: mixup and cutmix need an even batch, got {recipe.batch_size}")
    if recipe.schedule.name == "step" and recipe.schedule.step_epochs is None:
        raise RecipeError("schedule.step_epochs: required when schedule.name is step")
    if recipe.schedule.warmup_epochs >= recipe.epochs:
        raise RecipeError(f"schedule.warmup_epochs: {recipe.schedule.warmup_epochs} is not below epochs ({recipe.epochs})")
    low, high = recipe.augment.crop_scale
    if low > high:
        raise RecipeError(f"augment.crop_scale: lower bound {low} is above upper bound {high}")
    if recipe.augment.rand_augment is not None and not RAND_AUGMENT.fullmatch(recipe.augment.rand_augment):
        raise RecipeError(f"augment.rand_augment: {recipe.augment.rand_augment!r} is not a timm RandAugment string "
                          "such as 'rand-m9-mstd0.5-inc1' (parts m, n, mstd, mmax, p, inc, w, each with a number)")
    if recipe.optimizer.nesterov and recipe.optimizer.momentum == 0:
        raise RecipeError("optimizer.nesterov: Nesterov momentum needs optimizer.momentum above 0")


# ---------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class Profile:
    """Limits a profile puts on a recipe; None keeps the recipe's value."""

    name: str
    max_epochs: int | None = None
    max_batch_size: int | None = None
    max_people: int | None = None
    max_images_per_person: int | None = None
    num_workers: int = 0


# Loader processes for real runs: one core is left to the training process.
# Augmenting 160x160 crops runs about ten times faster than a DeiT-Ti train step
# on one CPU core, so a single worker keeps up on a 2-core machine.
LOADER_WORKERS = max(1, min(8, (os.cpu_count() or 2) - 1))

PROFILES = {
    # A few people, a few images, one epoch: for tests.
    "smoke": Profile("smoke", max_epochs=1, max_batch_size=8, max_people=4, max_images_per_person=8, num_workers=0),
    # All the data, fewer epochs: sized so that `make reproduce` (six recipes)
    # takes about half an hour on 2 CPU cores.
    "quick": Profile("quick", max_epochs=3, max_batch_size=64, num_workers=LOADER_WORKERS),
    "full": Profile("full", num_workers=LOADER_WORKERS),
}


@dataclass(frozen=True)
class Resolved:
    """A recipe after its profile: every value training reads, and what the profile changed."""

    recipe: Recipe
    profile: str
    epochs: int
    batch_size: int
    lr: float
    warmup_epochs: float
    step_epochs: float | None
    max_people: int | None
    max_images_per_person: int | None
    num_workers: int
    changes: dict

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve(recipe: Recipe, profile_name: str) -> Resolved:
    """Apply a profile: cap epochs and batch, rescale lr by the recipe's rule and
    warmup and step lengths with the epochs, and record each change."""
    if profile_name not in PROFILES:
        raise RecipeError(f"profile: unknown profile {profile_name!r} (allowed: {', '.join(PROFILES)})")
    profile = PROFILES[profile_name]
    epochs = min(recipe.epochs, profile.max_epochs or recipe.epochs)
    batch_size = min(recipe.batch_size, profile.max_batch_size or recipe.batch_size)
    epoch_scale = epochs / recipe.epochs
    schedule = recipe.schedule
    step_epochs = None if schedule.step_epochs is None else schedule.step_epochs * epoch_scale

    written = {
        "epochs": recipe.epochs,
        "batch_size": recipe.batch_size,
        "lr": recipe.optimizer.lr.lr_for(recipe.batch_size),
        "warmup_epochs": schedule.warmup_epochs,
        "step_epochs": schedule.step_epochs,
        "max_people": None,
        "max_images_per_person": None,
    }
    used = {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": recipe.optimizer.lr.lr_for(batch_size),
        "warmup_epochs": schedule.warmup_epochs * epoch_scale,
        "step_epochs": step_epochs,
        "max_people": profile.max_people,
        "max_images_per_person": profile.max_images_per_person,
    }
    changes = {k: {"recipe": written[k], "used": used[k]} for k in written if written[k] != used[k]}
    return Resolved(recipe=recipe, profile=profile_name, num_workers=profile.num_workers, changes=changes, **used)
