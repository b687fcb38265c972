"""Criteria -> verdicts, read from run folders: does SGD fail where AdamW works for DeiT?"""

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pandas as pd
import yaml

from facedeit.recipes import RecipeError

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
            "the claim \"SGD fails, AdamW works\" **holds** when every SGD run fails and every AdamW run works, "
            "**does not hold** when an SGD run works or an AdamW run fails, and is **inconclusive** otherwise",
        ]


def run_outcome(info: dict, steps: pd.DataFrame, epochs: pd.DataFrame, criteria: Criteria) -> dict:
    """Measure one run against the criteria: loss drop, top-1 margin, and fails/works/neither."""
    row = {"run": info["run"], "recipe": info["recipe"], "profile": info["profile"], "status": info["status"],
           "epochs_done": info.get("epochs_done", 0),
           "images_seen": int(steps["images"].sum()) if "images" in steps else None,
           "majority_top1": info["data"]["majority_top1"]}
    if info["status"] == "diverged" or steps.empty or epochs.empty:
        row.update(start_loss=None, end_loss=None, loss_drop=None, val_top1=None, top1_margin=None,
                   outcome=FAILS if info["status"] == "diverged" else NEITHER)
        return row
    if len(steps) < 2 * criteria.start_steps:
        # The start window and the last epoch would overlap, so the loss drop means nothing.
        row.update(start_loss=None, end_loss=None, loss_drop=None, val_top1=None, top1_margin=None,
                   outcome=TOO_SHORT)
        return row
    start_loss = steps["loss"].head(criteria.start_steps).mean()
    last_epoch = epochs["epoch"].max()
    end_loss = steps.loc[steps["epoch"] == last_epoch, "loss"].mean()
    loss_drop = 1.0 - end_loss / start_loss
    val_top1 = float(epochs.loc[epochs["epoch"] == last_epoch, "val_top1"].iloc[0])
    margin = val_top1 - row["majority_top1"]
    if loss_drop < criteria.fails_max_loss_drop and margin <= criteria.fails_max_top1_margin:
        outcome = FAILS
    elif loss_drop >= criteria.works_min_loss_drop and margin >= criteria.works_min_top1_margin:
        outcome = WORKS
    else:
        outcome = NEITHER
    row.update(start_loss=start_loss, end_loss=end_loss, loss_drop=loss_drop, val_top1=val_top1,
               top1_margin=margin, outcome=outcome)
    return row


def claim_verdict(sgd_outcomes: list[str], adamw_outcomes: list[str]) -> str:
    """"holds", "does not hold" or "inconclusive" for "SGD fails, AdamW works"."""
    if not sgd_outcomes or not adamw_outcomes:
        return "inconclusive"
    if WORKS in sgd_outcomes or FAILS in adamw_outcomes:
        return "does not hold"
    if all(o == FAILS for o in sgd_outcomes) and all(o == WORKS for o in adamw_outcomes):
        return "holds"
    return "inconclusive"


def criteria_dict(criteria: Criteria) -> dict:
    return asdict(criteria)


def load_criteria(path: str | Path) -> Criteria:
    """Read claims/criteria.yaml; every key must be a Criteria field with a number."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: criteria file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: invalid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping of criteria keys")
    types = {f.name: f.type for f in fields(Criteria)}
    values = {}
    for key, value in raw.items():
        if key not in types:
            raise RecipeError(f"{path}: {key}: unknown key (allowed: {', '.join(types)})")
        kind = int if types[key] in (int, "int") else float
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
            raise RecipeError(f"{path}: {key}: expected {'an integer' if kind is int else 'a number'}, got {value!r}")
        if value < 0 or (key in ("start_steps", "min_seeds") and value < 1):
            raise RecipeError(f"{path}: {key}: {value!r} is out of range")
        values[key] = kind(value)
    missing = sorted(set(types) - set(values))
    if missing:
        raise RecipeError(f"{path}: {missing[0]}: missing required key")
    return Criteria(**values)


def record_criteria(criteria_file: str | Path, results_dir: str | Path) -> dict:
    """Write results/claims/criteria.lock.json the first time claims are trained, and return it.

    It holds the criteria file's sha256 and the time, so that the report can
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
