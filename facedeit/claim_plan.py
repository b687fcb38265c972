"""claims/plan.yaml -> the list of runs behind the claims, in training order.

Each planned run is an ordinary recipe, or a recipe with dotted overrides
(`load_recipe(..., overrides, variant)`), trained into results/runs/ like
any other run. The report matches run folders to the plan by name.
"""

from dataclasses import dataclass, field
from pathlib import Path

from facedeit.recipes import PROFILES, Recipe, RecipeError, load_recipe, read_yaml_mapping
from facedeit.runs import run_name

EXPECTS = ("fails", "works")
PLAN_KEYS = {"profile", "claims", "sweep", "paper", "ablation"}


class PlanError(RecipeError):
    """A claims plan that cannot be used; the message names the file and key."""


@dataclass(frozen=True)
class Claim:
    name: str
    text: str
    expect: str                  # "fails" or "works"
    group: str                   # "claims" or "sweep"


@dataclass(frozen=True)
class PlannedRun:
    group: str                   # "claims", "sweep" or "ablation"
    label: str                   # claim name, sweep point or removed ingredient
    recipe: Recipe
    recipe_file: str
    seed: int
    params: dict = field(default_factory=dict)

    def run_name(self, profile: str) -> str:
        return run_name(self.recipe.name, profile, self.seed)


@dataclass(frozen=True)
class Plan:
    path: Path
    profile: str
    claims: list[Claim]
    both: list[dict]             # {"name", "text", "of": [claim names]}
    runs: list[PlannedRun]
    paper: dict

    def runs_of(self, group: str, label: str | None = None) -> list[PlannedRun]:
        return [r for r in self.runs if r.group == group and (label is None or r.label == label)]


def _need(mapping, key, where, kind):
    if not isinstance(mapping, dict) or key not in mapping:
        raise PlanError(f"{where}{key}: missing required key")
    value = mapping[key]
    if not isinstance(value, kind):
        raise PlanError(f"{where}{key}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _seeds(mapping, where) -> list[int]:
    seeds = _need(mapping, "seeds", where, list)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise PlanError(f"{where}seeds: expected a list of seeds (integers >= 0), got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise PlanError(f"{where}seeds: a seed is listed twice in {seeds!r}")
    return seeds


def _recipe(root: Path, file: str, where: str, overrides=None, variant=None) -> Recipe:
    path = root / file
    try:
        return load_recipe(path, overrides, variant)
    except RecipeError as err:
        raise PlanError(f"{where}: {err}") from None


def _number_name(value: float) -> str:
    return f"{value:g}"


def load_plan(path: str | Path, root: str | Path = ".") -> Plan:
    """Load and check claims/plan.yaml; recipe paths are relative to `root`."""
    path, root = Path(path), Path(root)
    try:
        raw = read_yaml_mapping(path, "plan")
    except RecipeError as err:
        raise PlanError(str(err)) from None
    unknown = sorted(set(raw) - PLAN_KEYS)
    if unknown:
        raise PlanError(f"{path}: {unknown[0]}: unknown key (allowed: {', '.join(sorted(PLAN_KEYS))})")
    profile = _need(raw, "profile", f"{path}: ", str)
    if profile not in PROFILES:
        raise PlanError(f"{path}: profile: unknown profile {profile!r} (allowed: {', '.join(PROFILES)})")

    claims, runs = [], []
    section = _need(raw, "claims", f"{path}: ", dict)
    seeds = _seeds(section, f"{path}: claims.")
    entries = _need(section, "list", f"{path}: claims.", list)
    for i, entry in enumerate(entries):
        where = f"{path}: claims.list[{i}]."
        claim = Claim(_need(entry, "name", where, str), _need(entry, "text", where, str),
                      _need(entry, "expect", where, str), "claims")
        if claim.expect not in EXPECTS:
            raise PlanError(f"{where}expect: {claim.expect!r} is not one of {', '.join(EXPECTS)}")
        if claim.name in {c.name for c in claims}:
            raise PlanError(f"{where}name: {claim.name!r} is used twice")
        claims.append(claim)
    recipes = {}
    for i, entry in enumerate(entries):
        file = _need(entry, "recipe", f"{path}: claims.list[{i}].", str)
        recipes[claims[i].name] = (file, _recipe(root, file, f"{path}: claims.list[{i}].recipe"))
    # Seed by seed, so that an interrupted run set has every claim at its first seeds.
    for seed in seeds:
        for claim in claims:
            file, recipe = recipes[claim.name]
            runs.append(PlannedRun("claims", claim.name, recipe, file, seed))
    both = section.get("both") or []
    for i, entry in enumerate(both):
        where = f"{path}: claims.both[{i}]."
        _need(entry, "name", where, str), _need(entry, "text", where, str)
        parts = _need(entry, "of", where, list)
        missing = [p for p in parts if p not in {c.name for c in claims}]
        if len(parts) < 2 or missing:
            raise PlanError(f"{where}of: expected two or more claim names from claims.list, got {parts!r}")

    sweep = _need(raw, "sweep", f"{path}: ", dict)
    where = f"{path}: sweep."
    claims.append(Claim(_need(sweep, "name", where, str), _need(sweep, "text", where, str),
                        _need(sweep, "expect", where, str), "sweep"))
    if claims[-1].expect not in EXPECTS:
        raise PlanError(f"{where}expect: {claims[-1].expect!r} is not one of {', '.join(EXPECTS)}")
    file = _need(sweep, "recipe", where, str)
    base = sweep.get("overrides") or {}
    lrs = _need(sweep, "lr", where, list)
    warmups = _need(sweep, "warmup_epochs", where, list)
    for key, values in (("lr", lrs), ("warmup_epochs", warmups)):
        if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise PlanError(f"{where}{key}: expected a list of numbers, got {values!r}")
    for seed in _seeds(sweep, where):
        for warmup in warmups:
            for lr in lrs:
                variant = f"sweep_lr{_number_name(lr)}_warmup{_number_name(warmup)}"
                overrides = {**base, "optimizer.lr": lr, "schedule.warmup_epochs": warmup}
                recipe = _recipe(root, file, f"{where}{variant}", overrides, variant)
                runs.append(PlannedRun("sweep", variant, recipe, file, seed, {"lr": lr, "warmup_epochs": warmup}))

    paper = _need(raw, "paper", f"{path}: ", dict)
    for key in ("adamw_top1", "sgd_top1"):
        _need(paper, key, f"{path}: paper.", (int, float))

    ablation = _need(raw, "ablation", f"{path}: ", dict)
    where = f"{path}: ablation."
    file = _need(ablation, "recipe", where, str)
    removals = _need(ablation, "remove", where, dict)
    full = _recipe(root, file, f"{where}recipe")
    variants = {}
    for ingredient, overrides in removals.items():
        if not isinstance(overrides, dict) or not overrides:
            raise PlanError(f"{where}remove.{ingredient}: expected a mapping of recipe keys to values")
        variants[ingredient] = _recipe(root, file, f"{where}remove.{ingredient}", overrides, f"no_{ingredient}")
    for seed in _seeds(ablation, where):
        runs.append(PlannedRun("ablation", "full", full, file, seed))
        for ingredient, recipe in variants.items():
            runs.append(PlannedRun("ablation", ingredient, recipe, file, seed))
    return Plan(path, profile, claims, both, _unique(runs, profile), paper)


def _unique(runs: list[PlannedRun], profile: str) -> list[PlannedRun]:
    """Drop repeats (the full ablation recipe may also be a claim run); keep the first place."""
    seen, out = set(), []
    for run in runs:
        key = (run.group, run.run_name(profile))
        if key in seen:
            continue
        seen.add(key)
        out.append(run)
    return out


def training_order(plan: Plan) -> list[PlannedRun]:
    """Return the distinct runs to train, each once, in plan order."""
    seen, out = set(), []
    for run in plan.runs:
        name = run.run_name(plan.profile)
        if name not in seen:
            seen.add(name)
            out.append(run)
    return out
