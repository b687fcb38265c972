"""claims/plan.yaml -> the list of runs behind the claims, in training order.

Each planned run is an ordinary recipe, or a recipe with dotted overrides
(`load_recipe(..., overrides, variant)`), trained into results/runs/ like
any other run. The report matches run folders to the plan by name.
"""

import re
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


# Claim names and ablation ingredients become parts of run folder names.
NAME = re.compile(r"[a-z0-9_]+")
KEYS = {
    "claims": {"seeds", "list", "both"},
    "claims.list[]": {"name", "text", "expect", "recipe"},
    "claims.both[]": {"name", "text", "of"},
    "sweep": {"name", "text", "expect", "recipe", "seeds", "overrides", "lr", "warmup_epochs"},
    "paper": {"source", "adamw_top1", "sgd_top1"},
    "ablation": {"recipe", "seeds", "remove"},
}
KIND_NAMES = {str: "a string", list: "a list", dict: "a mapping"}


def _need(mapping, key, where, kind):
    if key not in mapping:
        raise PlanError(f"{where}{key}: missing required key")
    value = mapping[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise PlanError(f"{where}{key}: expected {KIND_NAMES.get(kind, 'a number')}, got {value!r}")
    return value


def _section(mapping, key, where, keys_of) -> dict:
    """Return mapping[key] after checking that it is a mapping with only the keys of KEYS[keys_of]."""
    value = _need(mapping, key, where, dict) if key is not None else mapping
    unknown = sorted(set(value) - KEYS[keys_of])
    if unknown:
        prefix = f"{where}{key}." if key is not None else where
        raise PlanError(f"{prefix}{unknown[0]}: unknown key (allowed: {', '.join(sorted(KEYS[keys_of]))})")
    return value


def _name(value: str, key: str, used_names: set) -> str:
    if not NAME.fullmatch(value) or value == "full":
        raise PlanError(f"{key}: {value!r} is not a valid name (lowercase letters, digits and _, not 'full')")
    if value in used_names:
        raise PlanError(f"{key}: {value!r} is used twice")
    used_names.add(value)
    return value


def _expect(value: str, key: str) -> str:
    if value not in EXPECTS:
        raise PlanError(f"{key}: {value!r} is not one of {', '.join(EXPECTS)}")
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
    if not path.is_file():
        raise PlanError(f"{where}: {path}: recipe file not found (paths in a plan are relative to {root.resolve()})")
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
    where = f"{path}: "
    profile = _need(raw, "profile", where, str)
    if profile not in PROFILES:
        raise PlanError(f"{path}: profile: unknown profile {profile!r} (allowed: {', '.join(PROFILES)})")
    names: set = set()
    claims, both, claim_runs = _load_claims(_section(raw, "claims", where, "claims"), f"{where}claims.", root, names)
    sweep, sweep_runs = _load_sweep(_section(raw, "sweep", where, "sweep"), f"{where}sweep.", root, names)
    paper = _section(raw, "paper", where, "paper")
    for key in ("adamw_top1", "sgd_top1"):
        value = _need(paper, key, f"{where}paper.", (int, float))
        if not 0 <= value <= 100:
            raise PlanError(f"{where}paper.{key}: {value!r} is not a top-1 in percent (0 to 100)")
    ablation_runs = _load_ablation(_section(raw, "ablation", where, "ablation"), f"{where}ablation.", root)
    runs = _unique(claim_runs + sweep_runs + ablation_runs, profile)
    return Plan(path, profile, claims + [sweep], both, runs, paper)


def _load_claims(section: dict, where: str, root: Path, names: set):
    seeds = _seeds(section, where)
    entries = _need(section, "list", where, list)
    claims, recipes = [], {}
    for i, entry in enumerate(entries):
        at = f"{where}list[{i}]."
        if not isinstance(entry, dict):
            raise PlanError(f"{at[:-1]}: expected a mapping with name, text, expect and recipe, got {entry!r}")
        _section(entry, None, at, "claims.list[]")
        name = _name(_need(entry, "name", at, str), f"{at}name", names)
        claims.append(Claim(name, _need(entry, "text", at, str), _expect(_need(entry, "expect", at, str), f"{at}expect"),
                            "claims"))
        file = _need(entry, "recipe", at, str)
        recipes[name] = (file, _recipe(root, file, f"{at}recipe"))
    # Seed by seed, so that an interrupted run set has every claim at its first seeds.
    runs = [PlannedRun("claims", claim.name, recipes[claim.name][1], recipes[claim.name][0], seed)
            for seed in seeds for claim in claims]
    both = section.get("both") or []
    if not isinstance(both, list):
        raise PlanError(f"{where}both: expected a list of claims made of others, got {both!r}")
    for i, entry in enumerate(both):
        at = f"{where}both[{i}]."
        if not isinstance(entry, dict):
            raise PlanError(f"{at[:-1]}: expected a mapping with name, text and of, got {entry!r}")
        _section(entry, None, at, "claims.both[]")
        _name(_need(entry, "name", at, str), f"{at}name", names)
        _need(entry, "text", at, str)
        parts = _need(entry, "of", at, list)
        known = {c.name for c in claims}
        if len(parts) < 2 or any(p not in known for p in parts):
            raise PlanError(f"{at}of: expected two or more claim names from claims.list, got {parts!r}")
    return claims, both, runs


def _load_sweep(sweep: dict, where: str, root: Path, names: set):
    claim = Claim(_name(_need(sweep, "name", where, str), f"{where}name", names), _need(sweep, "text", where, str),
                  _expect(_need(sweep, "expect", where, str), f"{where}expect"), "sweep")
    file = _need(sweep, "recipe", where, str)
    base = sweep.get("overrides") or {}
    if not isinstance(base, dict):
        raise PlanError(f"{where}overrides: expected a mapping of recipe keys to values, got {base!r}")
    lrs = _need(sweep, "lr", where, list)
    warmups = _need(sweep, "warmup_epochs", where, list)
    for key, values in (("lr", lrs), ("warmup_epochs", warmups)):
        if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise PlanError(f"{where}{key}: expected a list of numbers, got {values!r}")
    runs, variants = [], set()
    for seed in _seeds(sweep, where):
        for warmup in warmups:
            for lr in lrs:
                variant = f"sweep_lr{_number_name(lr)}_warmup{_number_name(warmup)}"
                if (variant, seed) in variants:
                    raise PlanError(f"{where}lr: two points share the run name {variant!r}; use distinct values")
                variants.add((variant, seed))
                overrides = {**base, "optimizer.lr": lr, "schedule.warmup_epochs": warmup}
                recipe = _recipe(root, file, f"{where}{variant}", overrides, variant)
                runs.append(PlannedRun("sweep", variant, recipe, file, seed, {"lr": lr, "warmup_epochs": warmup}))
    return claim, runs


def _load_ablation(ablation: dict, where: str, root: Path) -> list[PlannedRun]:
    file = _need(ablation, "recipe", where, str)
    removals = _need(ablation, "remove", where, dict)
    full = _recipe(root, file, f"{where}recipe")
    variants, used_names = {}, set()
    for ingredient, overrides in removals.items():
        _name(str(ingredient), f"{where}remove.{ingredient}", used_names)
        if not isinstance(overrides, dict) or not overrides:
            raise PlanError(f"{where}remove.{ingredient}: expected a mapping of recipe keys to values")
        variants[ingredient] = _recipe(root, file, f"{where}remove.{ingredient}", overrides, f"no_{ingredient}")
    runs = []
    for seed in _seeds(ablation, where):
        runs.append(PlannedRun("ablation", "full", full, file, seed))
        runs.extend(PlannedRun("ablation", ingredient, recipe, file, seed) for ingredient, recipe in variants.items())
    return runs


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


def training_order(plan: Plan, group: str | None = None) -> list[PlannedRun]:
    """Return the distinct runs to train (of one group, or all), each once, in plan order."""
    seen, out = set(), []
    for run in plan.runs:
        name = run.run_name(plan.profile)
        if group not in (None, run.group) or name in seen:
            continue
        seen.add(name)
        out.append(run)
    return out
