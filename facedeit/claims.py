"""Criteria -> verdicts, read from run folders: does SGD fail where AdamW works for DeiT?"""

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import pandas as pd

from facedeit.recipes import RecipeError, read_yaml_mapping

FAILS, WORKS, NEITHER, TOO_SHORT = "fails", "works", "neither", "too short"


@dataclass(frozen=True)
class Criteria:
    """Thresholds of the SGD-versus-AdamW verdict.

    loss drop = 1 - (mean train loss of the last epoch) / (mean loss of the
    first `start_steps` updates). The top-1 margin is measured in percentage
    points above the majority-class rate of the val set (always guessing the
    person with the most photos), the chance level of an unbalanced set.
    """

    start_steps: int = 10
    fails_max_loss_drop: float = 0.10
    fails_max_top1_margin: float = 5.0
    works_min_loss_drop: float = 0.25
    works_min_top1_margin: float = 10.0
    min_seeds: int = 3

    def describe(self) -> list[str]:
        return [
            f"loss drop = 1 - (mean train loss over the last epoch) / (mean loss over the first {self.start_steps} updates)",
            f"top-1 margin = final val top-1 minus the val majority-class rate, in points",
            f"**fails**: the run diverged, or loss drop < {self.fails_max_loss_drop:.0%} "
            f"and top-1 margin <= {self.fails_max_top1_margin:g} points",
            f"**works**: loss drop >= {self.works_min_loss_drop:.0%} and top-1 margin >= {self.works_min_top1_margin:g} points",
            "anything between is **neither**; a run with fewer than "
            f"{2 * self.start_steps} updates is **too short** to judge",
            f"a claim that runs fail (or work) **holds** when every run does, over at least {self.min_seeds} "
            "seeds per recipe (the lr sweep: over every point), **does not hold** when one run has the opposite "
            "outcome, and is **inconclusive** otherwise",
        ]


def run_outcome(info: dict, steps: pd.DataFrame, epochs: pd.DataFrame, criteria: Criteria) -> dict:
    """Measure one run against the criteria: loss drop, top-1 margin, and fails/works/neither."""
    row = {"run": info["run"], "recipe": info["recipe"], "profile": info["profile"], "status": info["status"],
           "epochs_done": info.get("epochs_done", 0),
           "images_seen": int(steps["images"].sum()) if "images" in steps else None,
           "majority_top1": info["data"]["majority_top1"]}
    unmeasured = dict(start_loss=None, end_loss=None, loss_drop=None, loss_drop_uniform=None, val_top1=None,
                      top1_margin=None)
    if info["status"] == "diverged" or steps.empty or epochs.empty:
        row.update(unmeasured, outcome=FAILS if info["status"] == "diverged" else NEITHER)
        return row
    if len(steps) < 2 * criteria.start_steps:
        # The start window would be a large part of the run, so the loss drop would mean little.
        row.update(unmeasured, outcome=TOO_SHORT)
        return row
    start_loss = steps["loss"].head(criteria.start_steps).mean()
    last_epoch = epochs["epoch"].max()
    end_loss = steps.loc[steps["epoch"] == last_epoch, "loss"].mean()
    loss_drop = 1.0 - end_loss / start_loss
    # Not a criterion: the drop from ln(people), the loss of a uniform guess whatever the targets,
    # is not inflated by an early loss spike inside the start window.
    num_classes = info["data"].get("num_classes")
    row["loss_drop_uniform"] = 1.0 - end_loss / math.log(num_classes) if num_classes else None
    last = epochs.loc[epochs["epoch"] == last_epoch].iloc[0]
    val_top1 = float(last["val_top1"])
    margin = val_top1 - row["majority_top1"]
    # Not a criterion: it shows whether a run did more than predict the most frequent person.
    row["val_balanced_acc"] = float(last["val_balanced_acc"]) if "val_balanced_acc" in last else None
    if loss_drop < criteria.fails_max_loss_drop and margin <= criteria.fails_max_top1_margin:
        outcome = FAILS
    elif loss_drop >= criteria.works_min_loss_drop and margin >= criteria.works_min_top1_margin:
        outcome = WORKS
    else:
        outcome = NEITHER
    row.update(start_loss=start_loss, end_loss=end_loss, loss_drop=loss_drop, val_top1=val_top1,
               top1_margin=margin, outcome=outcome)
    return row


def load_criteria(path: str | Path) -> Criteria:
    """Read claims/criteria.yaml; every key must be a Criteria field with a number."""
    path = Path(path)
    raw = read_yaml_mapping(path, "criteria")
    types = {f.name: f.type for f in fields(Criteria)}
    values = {}
    for key, value in raw.items():
        if key not in types:
            raise RecipeError(f"{path}: {key}: unknown key (allowed: {', '.join(types)})")
        values[key] = _criteria_value(path, key, value, int if types[key] in (int, "int") else float)
    missing = sorted(set(types) - set(values))
    if missing:
        raise RecipeError(f"{path}: {missing[0]}: missing required key")
    for low, high in (("fails_max_loss_drop", "works_min_loss_drop"), ("fails_max_top1_margin", "works_min_top1_margin")):
        if values[low] > values[high]:
            raise RecipeError(f"{path}: {low}: {values[low]!r} is above {high} ({values[high]!r}), so a run could both "
                              "fail and work")
    return Criteria(**values)


def check_plan_criteria(plan, criteria: Criteria) -> None:
    """Raise PlanError when no claim of `plan` could ever hold under `criteria`."""
    from facedeit.claim_plan import PlanError

    seeds = {r.seed for r in plan.runs if r.group == "claims"}
    if criteria.min_seeds > len(seeds):
        raise PlanError(f"{plan.path}: claims.seeds: {len(seeds)} seed(s) planned but the criteria need min_seeds "
                        f"{criteria.min_seeds}, so no claim could hold; add seeds or lower min_seeds")


# Allowed ranges, inclusive: loss drops are fractions, top-1 margins percentage points.
CRITERIA_RANGES = {"start_steps": (1, None), "min_seeds": (1, None), "fails_max_loss_drop": (0.0, 1.0),
                   "works_min_loss_drop": (0.0, 1.0), "fails_max_top1_margin": (0.0, 100.0),
                   "works_min_top1_margin": (0.0, 100.0)}


def _criteria_value(path: Path, key: str, value, kind):
    if isinstance(value, bool):
        raise RecipeError(f"{path}: {key}: expected a number, got {value!r}")
    if kind is int:
        if not isinstance(value, int):
            raise RecipeError(f"{path}: {key}: expected an integer, got {value!r}")
    else:
        # PyYAML reads `3e-1` (no dot) as a string, as in recipe files.
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise RecipeError(f"{path}: {key}: expected a number, got {value!r}") from None
        if not math.isfinite(value):
            raise RecipeError(f"{path}: {key}: expected a finite number, got {value!r}")
    low, high = CRITERIA_RANGES[key]
    if value < low or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise RecipeError(f"{path}: {key}: {value!r} is out of range (must be {bounds})")
    return value


def record_criteria(criteria_file: str | Path, results_dir: str | Path) -> dict:
    """Write results/claims/criteria.lock.json the first time claims are trained, and return it.

    It contains the criteria file's sha256 and the time, so that the report can
    show that the criteria were fixed before the runs, or that they changed.
    """
    from facedeit.io import write_json_atomic
    from facedeit.runs import file_sha256, now_utc

    lock = Path(results_dir) / "claims" / "criteria.lock.json"
    if lock.is_file():
        return json.loads(lock.read_text())
    entry = {"file": str(criteria_file), "sha256": file_sha256(Path(criteria_file)), "recorded": now_utc()}
    write_json_atomic(lock, entry)
    return entry


# ---------------------------------------------------------------------------- claims of a plan

HOLDS, DOES_NOT_HOLD, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
OPPOSITE = {FAILS: WORKS, WORKS: FAILS}
OUTCOME_COLUMNS = ("group", "label", "run", "seed", "lr", "warmup_epochs", "status", "epochs_done", "images_seen",
                   "majority_top1", "start_loss", "end_loss", "loss_drop", "loss_drop_uniform", "val_top1", "top1_margin",
                   "val_balanced_acc", "outcome")


def expect_verdict(expect: str, outcomes: list[str], seeds: int, criteria: Criteria, need_seeds: bool = True,
                   complete: bool = True) -> str:
    """Return the verdict on "these runs `expect`" (fails or works) from the runs' outcomes.

    One run with the opposite outcome is enough to reject the claim. To hold,
    every run needs the claimed outcome, over at least `criteria.min_seeds`
    seeds unless `need_seeds` is false (the lr sweep, one run per point).
    Holding also needs `complete`: every planned run has been judged.
    """
    if OPPOSITE[expect] in outcomes:
        return DOES_NOT_HOLD
    if outcomes and complete and all(o == expect for o in outcomes) and (not need_seeds or seeds >= criteria.min_seeds):
        return HOLDS
    return INCONCLUSIVE


def both_verdict(verdicts: list[str]) -> str:
    """Return the verdict on a claim made of several: holds if all hold, does not hold if one does not."""
    if DOES_NOT_HOLD in verdicts:
        return DOES_NOT_HOLD
    if verdicts and all(v == HOLDS for v in verdicts):
        return HOLDS
    return INCONCLUSIVE


def _trained_as_planned(info: dict, planned, profile: str) -> bool:
    """Return True when a run.json's recipe values are those of the planned run under `profile`."""
    from facedeit.recipes import resolve
    from facedeit.runs import same_recipe_values

    return same_recipe_values(info["resolved"]["recipe"], resolve(planned.recipe, profile).to_dict()["recipe"])


def planned_status(plan, results_dir: Path) -> dict[str, str]:
    """Map each planned run name to its folder's status, or to `missing`, `changed` or `damaged (...)`.

    `changed` means the folder was trained with recipe values other than the
    plan's, and `damaged` that a finished run lacks rows of its CSV files.
    """
    from facedeit.runs import csv_rows, damaged_files, read_run_info

    statuses = {}
    for planned in plan.runs:
        name = planned.run_name(plan.profile)
        run_dir = Path(results_dir) / "runs" / name
        if not (run_dir / "run.json").is_file():
            statuses[name] = "missing"
            continue
        info = read_run_info(run_dir / "run.json")
        if not _trained_as_planned(info, planned, plan.profile):
            statuses[name] = "changed"
            continue
        damage = damaged_files(info, csv_rows(run_dir / "steps.csv"), csv_rows(run_dir / "epochs.csv"))
        statuses[name] = f"damaged ({damage})" if damage else info["status"]
    return statuses


def plan_outcomes(plan, runs: list[dict], criteria: Criteria) -> pd.DataFrame:
    """Tabulate each planned run: its outcome and metrics, or why it has none.

    `runs` come from facedeit.report.load_runs. A run folder counts only if
    its recipe values are the plan's. A folder trained from an older plan is
    listed as `changed` and left out of every verdict.
    """
    by_name = {r["info"]["run"]: r for r in runs}
    rows = []
    for planned in plan.runs:
        name = planned.run_name(plan.profile)
        base = {"group": planned.group, "label": planned.label, "run": name, "seed": planned.seed, **planned.params}
        run = by_name.get(name)
        if run is None:
            rows.append({**base, "status": "missing", "outcome": None})
            continue
        if not _trained_as_planned(run["info"], planned, plan.profile):
            rows.append({**base, "status": "changed", "outcome": None})
            continue
        if run["info"]["status"] in ("running", "stopped", "failed"):
            rows.append({**base, "status": run["info"]["status"], "outcome": None})
            continue
        if run.get("damaged"):
            rows.append({**base, "status": f"damaged ({run['damaged']})", "outcome": None})
            continue
        measured = run_outcome(run["info"], run["steps"], run["epochs"], criteria)
        measured.pop("run"), measured.pop("recipe")
        rows.append({**base, **measured})
    frame = pd.DataFrame(rows)
    # The same columns whether or not any run has been judged yet.
    for column in OUTCOME_COLUMNS:
        if column not in frame:
            frame[column] = None
    return frame


def _judged(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty or "outcome" not in frame:
        return frame
    return frame[frame["outcome"].notna()]


def _stats(values: pd.Series, prefix: str) -> dict:
    values = values.dropna()
    return {f"{prefix}_mean": values.mean() if len(values) else None,
            f"{prefix}_std": values.std(ddof=1) if len(values) > 1 else None,
            f"{prefix}_min": values.min() if len(values) else None,
            f"{prefix}_max": values.max() if len(values) else None}


def claim_summary(plan, outcomes: pd.DataFrame, criteria: Criteria) -> pd.DataFrame:
    """Summarize each claim in one row: runs, seeds, outcomes, val top-1 and loss drop over seeds, and the verdict."""
    rows, verdicts = [], {}
    for claim in plan.claims:
        frame = outcomes[(outcomes["group"] == claim.group)] if not outcomes.empty else outcomes
        if claim.group == "claims" and not frame.empty:
            frame = frame[frame["label"] == claim.name]
        judged = _judged(frame)
        outcome_list = list(judged["outcome"]) if not judged.empty else []
        seeds = judged["seed"].nunique() if not judged.empty else 0
        # The sweep has one seed per point, so it needs every point instead of min_seeds seeds.
        sweep = claim.group == "sweep"
        verdict = expect_verdict(claim.expect, outcome_list, seeds, criteria, need_seeds=not sweep,
                                 complete=not sweep or len(judged) == len(frame))
        verdicts[claim.name] = verdict
        counts = pd.Series(outcome_list, dtype=object).value_counts()
        rows.append({
            "claim": claim.name, "text": claim.text, "expect": claim.expect,
            "runs": len(judged), "planned": len(frame), "seeds": seeds,
            # A diverged run counts as failed but has no val top-1, so the top-1 statistics leave it out.
            "top1_runs": int(pd.to_numeric(judged["val_top1"]).notna().sum()) if not judged.empty else 0,
            "outcomes": ", ".join(f"{o} {int(counts[o])}" for o in counts.index) or "none",
            **_stats(judged["val_top1"] if not judged.empty else pd.Series(dtype=float), "val_top1"),
            **_stats(judged["loss_drop"] if not judged.empty else pd.Series(dtype=float), "loss_drop"),
            "val_balanced_acc_mean": pd.to_numeric(judged["val_balanced_acc"]).mean() if not judged.empty else None,
            "epochs": "/".join(str(int(e)) for e in sorted(set(judged["epochs_done"]))) if not judged.empty else "",
            "images_seen_per_run": judged["images_seen"].mean() if not judged.empty else None,
            "verdict": verdict,
        })
    for entry in plan.both:
        parts = [verdicts[name] for name in entry["of"]]
        rows.append({"claim": entry["name"], "text": entry["text"], "expect": "both",
                     "outcomes": "; ".join(f"{name}: {verdicts[name]}" for name in entry["of"]),
                     "verdict": both_verdict(parts)})
    return pd.DataFrame(rows)


def sweep_table(outcomes: pd.DataFrame) -> pd.DataFrame:
    """Tabulate the lr sweep, one row per (warmup, lr) point with its outcome, val top-1 and loss drop."""
    frame = outcomes[outcomes["group"] == "sweep"] if not outcomes.empty else outcomes
    if frame.empty:
        return pd.DataFrame()
    columns = [c for c in ("warmup_epochs", "lr", "seed", "status", "outcome", "val_top1", "top1_margin",
                           "start_loss", "end_loss", "loss_drop", "loss_drop_uniform") if c in frame]
    return frame[columns].sort_values(["warmup_epochs", "lr", "seed"]).reset_index(drop=True)


def _top1_by_seed(group: pd.DataFrame) -> pd.Series:
    judged = _judged(group)
    if judged.empty:
        return pd.Series(dtype=float)
    return pd.to_numeric(judged.set_index("seed")["val_top1"]).dropna()


def ablation_table(outcomes: pd.DataFrame) -> pd.DataFrame:
    """Tabulate val top-1 over seeds per removed ingredient, and its difference from the full recipe.

    `vs_full` is the mean over the seeds that both the row and the full
    recipe have (`paired_seeds`), so rows with fewer seeds are not compared
    with the full recipe's other seeds.
    """
    frame = outcomes[outcomes["group"] == "ablation"] if not outcomes.empty else outcomes
    if frame.empty:
        return pd.DataFrame()
    full = _top1_by_seed(frame[frame["label"] == "full"])
    rows = []
    for label, group in frame.groupby("label", sort=False):
        judged = _judged(group)
        top1 = _top1_by_seed(group)
        paired = top1.index.intersection(full.index)
        rows.append({"removed": "none (full recipe)" if label == "full" else label,
                     "runs": len(judged), "planned": len(group),
                     **_stats(judged["val_top1"] if "val_top1" in judged else pd.Series(dtype=float), "val_top1"),
                     # In seed order, so that each outcome can be matched to its run.
                     "outcomes": ", ".join(judged.sort_values("seed")["outcome"]) if not judged.empty else "none",
                     "paired_seeds": len(paired),
                     "vs_full": (top1[paired] - full[paired]).mean() if len(paired) else None})
    return pd.DataFrame(rows)
