"""Claims criteria, verdicts and the claims report on hand-made run files; nothing is trained."""

import pandas as pd
import pytest

from facedeit.claims import (DOES_NOT_HOLD, FAILS, HOLDS, INCONCLUSIVE, NEITHER, TOO_SHORT, WORKS, Criteria,
                             both_verdict, expect_verdict, run_outcome)


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


def test_diverged_run_fails():
    row = run_outcome(_run(status="diverged"), _steps(4.0, 4.0).head(3), pd.DataFrame(), Criteria())
    assert row["outcome"] == FAILS


def test_short_run_is_too_short():
    row = run_outcome(_run(), _steps(4.0, 2.0).tail(12), _epochs(45.0), Criteria())
    assert row["outcome"] == TOO_SHORT
    assert expect_verdict(WORKS, [TOO_SHORT, WORKS, WORKS], 3, Criteria()) == INCONCLUSIVE


def test_run_without_epochs_is_neither():
    assert run_outcome(_run(status="failed"), pd.DataFrame(), pd.DataFrame(), Criteria())["outcome"] == NEITHER


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
