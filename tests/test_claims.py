"""Claims criteria, verdicts and the claims report on hand-made run files; nothing is trained."""

import math

import pandas as pd
import pytest

from facedeit.claims import (DOES_NOT_HOLD, FAILS, HOLDS, INCONCLUSIVE, NEITHER, TOO_SHORT, WORKS, Criteria,
                             ablation_table, both_verdict, claim_summary, expect_verdict, run_outcome)
from facedeit.claims_report import _adamw_never_works, _paper_lines


def _run(status="finished", majority=20.0):
    return {"run": "r", "recipe": "seed_sgd", "profile": "quick", "status": status, "epochs_done": 3,
            "data": {"majority_top1": majority}}


def _steps(start, end):
    return pd.DataFrame({"epoch": [0] * 20 + [2] * 5, "loss": [start] * 20 + [end] * 5})


def _epochs(top1):
    return pd.DataFrame({"epoch": [0, 1, 2], "val_top1": [10.0, 15.0, top1]})


@pytest.mark.parametrize("start, end, top1, outcome", [
    (4.0, 3.9, 21.0, FAILS),      # 2.5% drop, 1 point above majority
    (4.0, 2.0, 45.0, WORKS),      # 50% drop, 25 points above
    (4.0, 2.0, 22.0, NEITHER),    # loss fell but val top-1 did not rise
    (4.0, 3.9, 40.0, NEITHER),    # val rose while the loss stayed
])
def test_outcome_thresholds(start, end, top1, outcome):
    row = run_outcome(_run(), _steps(start, end), _epochs(top1), Criteria())
    assert row["outcome"] == outcome
    assert row["loss_drop"] == pytest.approx(1 - end / start)
    assert row["top1_margin"] == pytest.approx(top1 - 20.0)


@pytest.mark.parametrize("end, top1, outcome", [
    (3.5, 21.0, NEITHER),    # loss drop exactly at the fails line is not a failure
    (3.6, 25.0, FAILS),      # top-1 margin exactly at the fails line still fails
    (2.0, 30.0, WORKS),      # both exactly at the works lines
    (2.0, 29.5, NEITHER),
    (2.01, 30.0, NEITHER),
])
def test_outcome_at_threshold(end, top1, outcome):
    # Drops of 0.125 and 0.5 from a start loss of 4.0 are exact in binary floating point.
    criteria = Criteria(fails_max_loss_drop=0.125, works_min_loss_drop=0.5)
    assert run_outcome(_run(), _steps(4.0, end), _epochs(top1), criteria)["outcome"] == outcome


def test_diverged_run_fails():
    row = run_outcome(_run(status="diverged"), _steps(4.0, 4.0).head(3), pd.DataFrame(), Criteria())
    assert row["outcome"] == FAILS


def test_short_run_is_too_short():
    row = run_outcome(_run(), _steps(4.0, 2.0).tail(12), _epochs(45.0), Criteria())
    assert row["outcome"] == TOO_SHORT
    assert expect_verdict(WORKS, [TOO_SHORT, WORKS, WORKS], 3, Criteria()) == INCONCLUSIVE


def test_finished_run_without_epochs_is_neither():
    row = run_outcome(_run(), _steps(4.0, 2.0), pd.DataFrame(), Criteria())
    assert row["outcome"] == NEITHER
    assert row["val_top1"] is None


def test_loss_drop_from_uniform_guess():
    info = _run()
    info["data"]["num_classes"] = 10
    row = run_outcome(info, _steps(4.0, 2.0), _epochs(45.0), Criteria())
    assert row["loss_drop_uniform"] == pytest.approx(1 - 2.0 / math.log(10))


@pytest.mark.parametrize("expect, outcomes, seeds, verdict", [
    (FAILS, [FAILS, FAILS, FAILS], 3, HOLDS),
    (FAILS, [FAILS], 1, INCONCLUSIVE),              # one seed cannot make a claim hold
    (WORKS, [WORKS], 1, INCONCLUSIVE),
    (WORKS, [FAILS], 1, DOES_NOT_HOLD),             # but one counter-example rejects it
    (FAILS, [FAILS, WORKS, FAILS], 3, DOES_NOT_HOLD),
    (WORKS, [WORKS, NEITHER, WORKS], 3, INCONCLUSIVE),
    (WORKS, [], 0, INCONCLUSIVE),
])
def test_expect_verdict(expect, outcomes, seeds, verdict):
    assert expect_verdict(expect, outcomes, seeds, Criteria()) == verdict


def test_sweep_verdict_needs_every_point():
    assert expect_verdict(FAILS, [FAILS, FAILS], 1, Criteria(), need_seeds=False) == HOLDS
    assert expect_verdict(FAILS, [FAILS, FAILS], 1, Criteria(), need_seeds=False, complete=False) == INCONCLUSIVE
    assert expect_verdict(FAILS, [FAILS, WORKS], 1, Criteria(), need_seeds=False, complete=False) == DOES_NOT_HOLD


@pytest.mark.parametrize("parts, verdict", [
    ([HOLDS, HOLDS], HOLDS),
    ([HOLDS, INCONCLUSIVE], INCONCLUSIVE),
    ([INCONCLUSIVE, DOES_NOT_HOLD], DOES_NOT_HOLD),
])
def test_both_verdict(parts, verdict):
    assert both_verdict(parts) == verdict


def _outcomes(rows):
    """Rows of plan_outcomes: (group, label, seed, outcome, val_top1); outcome None means not trained."""
    return pd.DataFrame([{"group": group, "label": label, "seed": seed, "outcome": outcome, "val_top1": top1,
                          "loss_drop": None, "val_balanced_acc": None, "epochs_done": 3, "images_seen": 100}
                         for group, label, seed, outcome, top1 in rows])


class _Claim:
    def __init__(self, name, group, expect):
        self.name, self.group, self.expect, self.text = name, group, expect, name


class _Plan:
    def __init__(self, claims):
        self.claims, self.both, self.profile = claims, [], "quick"
        self.paper = {"source": "Table 8", "adamw_top1": 81.8, "sgd_top1": 74.5}


def test_sweep_summary_missing_point_inconclusive():
    plan = _Plan([_Claim("every_lr", "sweep", FAILS)])
    partial = _outcomes([("sweep", "lr0.01", 0, FAILS, 20.0), ("sweep", "lr0.1", 0, None, None)])
    assert claim_summary(plan, partial, Criteria())["verdict"].iloc[0] == INCONCLUSIVE
    complete = _outcomes([("sweep", "lr0.01", 0, FAILS, 20.0), ("sweep", "lr0.1", 0, FAILS, 20.0)])
    assert claim_summary(plan, complete, Criteria())["verdict"].iloc[0] == HOLDS


def test_ablation_compares_same_seeds():
    outcomes = _outcomes([("ablation", "full", 0, FAILS, 20.0), ("ablation", "full", 1, FAILS, 22.0),
                          ("ablation", "full", 2, FAILS, 24.0), ("ablation", "mixup", 0, FAILS, 25.0),
                          ("ablation", "mixup", 1, None, None)])
    table = ablation_table(outcomes).set_index("removed")
    assert table.loc["mixup", "paired_seeds"] == 1
    assert table.loc["mixup", "vs_full"] == pytest.approx(5.0)   # against seed 0's 20.0, not the mean 22.0
    assert table.loc["none (full recipe)", "vs_full"] == pytest.approx(0.0)


@pytest.mark.parametrize("sgd_verdict, adamw, expected", [
    (HOLDS, [FAILS, NEITHER], True),
    (HOLDS, [FAILS, WORKS], False),
    (HOLDS, [FAILS, None], False),             # an AdamW run not trained yet
    (INCONCLUSIVE, [FAILS, FAILS], False),
])
def test_adamw_never_works(sgd_verdict, adamw, expected):
    outcomes = _outcomes([("claims", "team_adamw_works", 0, adamw[0], 18.0),
                          ("claims", "deit_b_works", 0, adamw[1], 18.0)])
    summary = pd.DataFrame({"claim": ["team_sgd_fails"], "verdict": [sgd_verdict]})
    assert _adamw_never_works(outcomes, summary) is expected


@pytest.mark.parametrize("full_outcome, sgd_seed, expected", [
    (FAILS, 0, "Every one of these runs fails by the criteria, so there is no gap"),
    (WORKS, 0, "SGD minus AdamW at the same seed is -10.00 points over 1 seed(s) (paper -7.3)"),
    (WORKS, 1, "the two rows share no seed, so they are not compared"),
])
def test_paper_lines_gap_only_when_measurable(full_outcome, sgd_seed, expected):
    full_top1 = 30.0 if full_outcome == WORKS else 20.0
    outcomes = _outcomes([("ablation", "full", 0, full_outcome, full_top1),
                          ("ablation", "adamw", sgd_seed, FAILS, 20.0)])
    summary = pd.DataFrame({"claim": ["team_sgd_fails"], "verdict": [HOLDS], "val_top1_mean": [20.0]})
    lines = _paper_lines(_Plan([]), outcomes, summary, ablation_table(outcomes), pd.DataFrame(), 3)
    assert any(expected in line for line in lines)
