"""claims/plan.yaml and criteria.yaml loading, and the claims report from hand-made run folders."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO
from facedeit.claim_plan import PlanError, load_plan, training_order
from facedeit.claims import load_criteria, record_criteria
from facedeit.cli import main
from facedeit.recipes import RecipeError, resolve
from facedeit.report import write_report

PLAN = """\
profile: quick
claims:
  seeds: [0, 1, 2]
  list:
    - {name: sgd_fails, text: "SGD does not learn", expect: fails, recipe: recipes/seed_sgd.yaml}
    - {name: adamw_works, text: "AdamW learns", expect: works, recipe: recipes/seed_adamw.yaml}
  both:
    - {name: claim, text: "SGD fails where AdamW works", of: [sgd_fails, adamw_works]}
sweep:
  name: sgd_every_lr
  text: "SGD does not learn at any lr"
  expect: fails
  recipe: recipes/seed_sgd.yaml
  seeds: [0]
  overrides: {schedule: {name: cosine, warmup_epochs: 0, min_lr: 0.0}}
  lr: [0.01, 0.1]
  warmup_epochs: [0]
paper: {source: "arXiv 2012.12877, Table 8", adamw_top1: 81.8, sgd_top1: 74.5}
ablation:
  recipe: recipes/deit_b_paper_tiny.yaml
  seeds: [0]
  remove:
    mixup: {augment.mixup: 0.0}
    adamw: {optimizer: {name: sgd, lr: 0.01, momentum: 0.9}}
"""

CRITERIA = (REPO / "claims" / "criteria.yaml").read_text()
MAJORITY = 20.0
STEPS_PER_EPOCH = 12


@pytest.fixture
def plan_file(tmp_path) -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(PLAN)
    return path


def write_run(results: Path, planned, profile: str, status: str, loss: tuple, top1: float) -> None:
    """Write a run folder as training would: run.json, steps.csv, epochs.csv and eval_batches.csv."""
    name = planned.run_name(profile)
    folder = results / "runs" / name
    folder.mkdir(parents=True)
    resolved = json.loads(json.dumps(resolve(planned.recipe, profile).to_dict(), default=str))

    updates = 3 * STEPS_PER_EPOCH if status != "diverged" else 5
    losses = np.linspace(loss[0], loss[1], updates)
    steps = pd.DataFrame({"epoch": np.arange(updates) // STEPS_PER_EPOCH, "step": np.arange(1, updates + 1),
                          "lr": 0.01, "loss": losses, "grad_norm": 1.0, "images": 32, "step_ms": 100.0,
                          "data_ms": 1.0, "images_per_s": 320.0, "warmup": np.arange(updates) < 2})
    if status == "diverged":
        steps.loc[updates - 1, "loss"] = float("nan")
    epochs = pd.DataFrame({"epoch": [0, 1, 2], "train_loss": [losses[min(i * STEPS_PER_EPOCH, updates - 1)] for i in range(3)], "train_images_per_s": 320.0,
                           "train_s": 1.2, "lr_end": 0.01, "val_loss": 3.0, "val_top1": [MAJORITY, MAJORITY, top1],
                           "val_top5": 50.0, "top5_k": 5, "val_balanced_acc": 5.0, "val_images": 100})

    epochs_done = 3
    if status == "diverged":
        epochs = epochs.iloc[0:0]
        epochs_done = 0

    evals = pd.DataFrame({"epoch": [0], "batch": [0], "images": [64], "images_per_s": [900.0]})
    info = {"run": name, "recipe": planned.recipe.name, "recipe_file": planned.recipe_file, "profile": profile,
            "seed": planned.seed, "status": status, "epochs_done": epochs_done, "resolved": resolved,
            "schedule_updates": {"steps_per_epoch": STEPS_PER_EPOCH, "total_updates": 3 * STEPS_PER_EPOCH},
            "model": {"name": planned.recipe.model.name}, "departures": [],
            "data": {"crops_dir": str(results / "no_crops"), "split_sha256": "abc", "num_classes": 10, "train_images": 400, "val_images": 100,
                     "chance_top1": 10.0, "majority_top1": MAJORITY},
            "env": {"device_name": "cpu", "python": "3", "packages": {}, "git_commit": None},
            "started": "2026-01-01T00:00:00+00:00"}
    (folder / "run.json").write_text(json.dumps(info))
    steps.to_csv(folder / "steps.csv", index=False)
    epochs.to_csv(folder / "epochs.csv", index=False)
    evals.to_csv(folder / "eval_batches.csv", index=False)


def test_plan_order_and_names(plan_file):
    plan = load_plan(plan_file, REPO)
    names = [r.run_name(plan.profile) for r in training_order(plan)]
    # Every claim at seed 0 before any claim at seed 1.
    assert names[:3] == ["seed_sgd-quick-seed0", "seed_adamw-quick-seed0", "seed_sgd-quick-seed1"]
    assert "seed_sgd.sweep_lr0.1_warmup0-quick-seed0" in names
    assert "deit_b_paper_tiny.no_mixup-quick-seed0" in names
    variant = next(r for r in plan.runs if r.label == "adamw")
    assert variant.recipe.optimizer.name == "sgd"
    assert variant.recipe.augment.mixup == 0.8
    assert len(names) == len(set(names))


@pytest.mark.parametrize("edit, key", [
    (("profile: quick", "profile: fast"), "profile"),
    (("expect: fails, recipe", "expect: maybe, recipe"), "expect"),
    (("augment.mixup: 0.0", "augment.mixups: 0.0"), "augment.mixups"),
    (("recipes/seed_adamw.yaml", "recipes/nothing.yaml"), "recipes/nothing.yaml"),
    (("paper:", "papers:"), "papers"),
    (("seeds: [0, 1, 2]", "seeds: [0, 0]"), "seeds"),
    (("of: [sgd_fails, adamw_works]", "of: [sgd_fails, other]"), "of"),
    (("seeds: [0, 1, 2]", "seeds: [0, 1, 2]\n  seed: [5]"), "claims.seed"),
    (("recipe: recipes/seed_sgd.yaml}", "recipe: recipes/seed_sgd.yaml, overrides: {}}"), "claims.list[0].overrides"),
    (("adamw_top1: 81.8", "adamw_top1: 818"), "paper.adamw_top1"),
    (("  overrides: {schedule: {name: cosine, warmup_epochs: 0, min_lr: 0.0}}", "  overrides: [1, 2]"), "sweep.overrides"),
    (("lr: [0.01, 0.1]", "lr: [0.01, 0.0100000001]"), "sweep.lr"),
    (("name: sgd_every_lr", "name: sgd_fails"), "sweep.name"),
    (("  both:\n    - {name: claim, text: \"SGD fails where AdamW works\", of: [sgd_fails, adamw_works]}", "  both: x"),
     "claims.both"),
    (("    mixup: {augment.mixup: 0.0}", "    full: {augment.mixup: 0.0}"), "ablation.remove.full"),
    (("    mixup: {augment.mixup: 0.0}", "    ../x: {augment.mixup: 0.0}"), "ablation.remove.../x"),
])
def test_plan_errors_name_the_key(tmp_path, edit, key):
    path = tmp_path / "plan.yaml"
    path.write_text(PLAN.replace(*edit, 1))
    with pytest.raises(PlanError) as err:
        load_plan(path, REPO)
    assert key in str(err.value)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("edit, key", [
    (("min_seeds: 3", "min_seeds: 0"), "min_seeds"),
    (("min_seeds: 3", "min_seeds: 3\nmax_seeds: 4"), "max_seeds"),
    (("start_steps: 10\n", ""), "start_steps"),
    (("fails_max_loss_drop: 0.10", "fails_max_loss_drop: low"), "fails_max_loss_drop"),
    (("fails_max_loss_drop: 0.10", "fails_max_loss_drop: .nan"), "fails_max_loss_drop"),
    (("works_min_loss_drop: 0.25", "works_min_loss_drop: 25"), "works_min_loss_drop"),
    (("fails_max_top1_margin: 5.0", "fails_max_top1_margin: 12.0"), "fails_max_top1_margin"),
])
def test_criteria_errors_name_the_key(tmp_path, edit, key):
    path = tmp_path / "criteria.yaml"
    path.write_text(CRITERIA.replace(*edit, 1))
    with pytest.raises(RecipeError, match=key):
        load_criteria(path)


def test_claims_command_rejects_bad_plan(tmp_path, capsys):
    path = tmp_path / "plan.yaml"
    path.write_text(PLAN.replace("lr: [0.01, 0.1]", "lr: [fast]"))
    assert main(["claims", "--plan", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "sweep.lr" in err


def test_report_from_hand_made_runs(tmp_path, plan_file, monkeypatch):
    monkeypatch.chdir(REPO)
    plan = load_plan(plan_file, REPO)
    results = tmp_path / "results"
    criteria_file = tmp_path / "criteria.yaml"
    criteria_file.write_text(CRITERIA)
    runs = {(r.label, r.seed, r.group): r for r in plan.runs}
    # SGD: three seeds, one diverged; all fail.
    write_run(results, runs[("sgd_fails", 0, "claims")], "quick", "finished", (4.0, 3.9), MAJORITY + 1)
    write_run(results, runs[("sgd_fails", 1, "claims")], "quick", "finished", (4.0, 3.8), MAJORITY)
    write_run(results, runs[("sgd_fails", 2, "claims")], "quick", "diverged", (4.0, 4.0), MAJORITY)
    # AdamW: a single seed that works.
    write_run(results, runs[("adamw_works", 0, "claims")], "quick", "finished", (4.0, 2.0), MAJORITY + 30)
    # A finished AdamW run whose epochs.csv is lost is damaged: listed, not judged.
    write_run(results, runs[("adamw_works", 1, "claims")], "quick", "finished", (4.0, 2.0), MAJORITY + 30)
    (results / "runs" / runs[("adamw_works", 1, "claims")].run_name("quick") / "epochs.csv").unlink()
    # Sweep: lr 0.1 works, so "SGD fails at every lr" does not hold.
    write_run(results, runs[("sweep_lr0.01_warmup0", 0, "sweep")], "quick", "finished", (4.0, 3.9), MAJORITY)
    write_run(results, runs[("sweep_lr0.1_warmup0", 0, "sweep")], "quick", "finished", (4.0, 2.5), MAJORITY + 15)
    write_run(results, runs[("full", 0, "ablation")], "quick", "finished", (4.0, 2.0), MAJORITY + 20)
    write_run(results, runs[("mixup", 0, "ablation")], "quick", "finished", (4.0, 2.0), MAJORITY + 12)

    write_report(results, REPO / "recipes", criteria_file, plan_file)

    summary = pd.read_csv(results / "tables" / "claims_summary.csv").set_index("claim")
    assert summary.loc["sgd_fails", "verdict"] == "holds"
    assert summary.loc["sgd_fails", "seeds"] == 3
    assert summary.loc["adamw_works", "verdict"] == "inconclusive"     # one seed only
    assert summary.loc["claim", "verdict"] == "inconclusive"
    assert summary.loc["sgd_every_lr", "verdict"] == "does not hold"
    assert summary.loc["sgd_fails", "val_top1_mean"] == pytest.approx(MAJORITY + 1 / 2)  # diverged has no top-1
    assert summary.loc["sgd_fails", "top1_runs"] == 2
    assert summary.loc["adamw_works", "outcomes"] == "works 1"
    outcomes = pd.read_csv(results / "tables" / "claims_runs.csv").set_index("run")
    assert outcomes.loc["seed_sgd-quick-seed2", "outcome"] == "fails"
    assert outcomes.loc["seed_adamw-quick-seed1", "status"] == "damaged (epochs.csv has 0 of 3 epochs)"
    assert pd.isna(outcomes.loc["seed_adamw-quick-seed1", "outcome"])
    assert outcomes.loc["seed_adamw-quick-seed2", "status"] == "missing"
    ablation = pd.read_csv(results / "tables" / "claims_ablation.csv").set_index("removed")
    assert ablation.loc["mixup", "vs_full"] == pytest.approx(-8.0)
    assert ablation.loc["mixup", "paired_seeds"] == 1
    assert ablation.loc["adamw", "runs"] == 0
    report = (results / "REPORT.md").read_text()
    assert "**SGD does not learn: holds** at profile `quick`" in report
    assert "81.8% top-1 with AdamW" in report
    assert "has not been recorded" in report
    assert "It is at the top of the lr grid" in report
    assert "**1 finished run folder(s) lack rows of their CSV files**: `seed_adamw-quick-seed1`" in report
    assert "No AdamW run works" not in report
    for plot in ("claims_curves.png", "claims_sweep.png", "claims_ablation.png"):
        assert (results / "plots" / plot).stat().st_size > 0


def test_report_flags_changed_runs_and_criteria(tmp_path, plan_file, monkeypatch):
    monkeypatch.chdir(REPO)
    plan = load_plan(plan_file, REPO)
    results = tmp_path / "results"
    criteria_file = tmp_path / "criteria.yaml"
    criteria_file.write_text(CRITERIA)
    record_criteria(criteria_file, results)
    criteria_file.write_text(CRITERIA.replace("min_seeds: 3", "min_seeds: 1"))
    first = plan.runs[0]
    write_run(results, first, "quick", "finished", (4.0, 3.9), MAJORITY)
    info_file = results / "runs" / first.run_name("quick") / "run.json"
    info = json.loads(info_file.read_text())
    info["resolved"]["recipe"]["optimizer"]["lr"]["base"] = 0.5
    info_file.write_text(json.dumps(info))

    write_report(results, REPO / "recipes", criteria_file, plan_file)

    outcomes = pd.read_csv(results / "tables" / "claims_runs.csv").set_index("run")
    assert outcomes.loc[first.run_name("quick"), "status"] == "changed"
    assert "differ from it" in (results / "REPORT.md").read_text()


def test_criteria_accept_exponent_strings(tmp_path):
    path = tmp_path / "criteria.yaml"
    path.write_text(CRITERIA.replace("works_min_loss_drop: 0.25", "works_min_loss_drop: 3e-1"))
    assert load_criteria(path).works_min_loss_drop == pytest.approx(0.3)


def test_min_seeds_above_planned_seeds(tmp_path, plan_file):
    from facedeit.claims import check_plan_criteria

    path = tmp_path / "criteria.yaml"
    path.write_text(CRITERIA.replace("min_seeds: 3", "min_seeds: 4"))
    with pytest.raises(PlanError, match="min_seeds"):
        check_plan_criteria(load_plan(plan_file, REPO), load_criteria(path))


def test_only_ablation_includes_full_recipe(plan_file):
    plan = load_plan(plan_file, REPO)
    labels = [r.label for r in training_order(plan, "ablation")]
    assert labels == ["full", "mixup", "adamw"]


def test_report_rejects_missing_plan(tmp_path, capsys):
    assert main(["report", "--results", str(tmp_path), "--plan", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml: plan file not found" in capsys.readouterr().err


def test_claims_rejects_changed_run_before_training(tmp_path, plan_file, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    plan = load_plan(plan_file, REPO)
    results = tmp_path / "results"
    criteria_file = tmp_path / "criteria.yaml"
    criteria_file.write_text(CRITERIA)
    first = plan.runs[0]
    write_run(results, first, "quick", "finished", (4.0, 3.9), MAJORITY)
    info_file = results / "runs" / first.run_name("quick") / "run.json"
    info = json.loads(info_file.read_text())
    info["resolved"]["recipe"]["description"] = "edited text only"
    info_file.write_text(json.dumps(info))
    args = ["claims", "--plan", str(plan_file), "--criteria", str(criteria_file), "--results", str(results),
            "--crops", str(tmp_path / "no_crops")]

    # A description edit does not change what the run trains, so only the missing crops stop the command.
    assert main(args) == 2
    assert "no_crops/split.csv: not found" in capsys.readouterr().err

    info["resolved"]["recipe"]["optimizer"]["lr"]["base"] = 0.5
    info_file.write_text(json.dumps(info))
    assert main(args) == 2
    assert "was trained with other recipe values" in capsys.readouterr().err
    assert not (results / "claims" / "criteria.lock.json").exists()


def test_claims_rejects_damaged_run(tmp_path, plan_file, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    plan = load_plan(plan_file, REPO)
    results = tmp_path / "results"
    first = plan.runs[0]
    write_run(results, first, "quick", "finished", (4.0, 3.9), MAJORITY)
    steps_file = results / "runs" / first.run_name("quick") / "steps.csv"
    steps_file.write_text("\n".join(steps_file.read_text().splitlines()[:5]) + "\n")
    args = ["claims", "--plan", str(plan_file), "--results", str(results), "--crops", str(tmp_path / "crops")]
    assert main(args + ["--dry-run"]) == 0
    assert f"{first.run_name('quick')}: damaged (steps.csv has 4 of 36 updates)" in capsys.readouterr().out
    assert main(args) == 2
    assert "damaged (steps.csv has 4 of 36 updates)" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "expected a JSON object, got list"),
    ("{}", "run: missing key"),
])
def test_report_rejects_bad_run_json(tmp_path, capsys, content, message):
    folder = tmp_path / "results" / "runs" / "broken"
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(content)
    assert main(["report", "--results", str(tmp_path / "results")]) == 2
    assert capsys.readouterr().err.startswith(f"facedeit: error: {folder / 'run.json'}: {message}")
