import json
import shutil

import pandas as pd
import pytest
import torch

import facedeit.train as train_module
from facedeit.cli import main
from facedeit.recipes import load_recipe
from facedeit.train import RunExistsError, train_recipe
from tests.conftest import REPO, TINY_RECIPE, write_recipe

MIXUP_RA_RECIPE = TINY_RECIPE.replace("model: {name: deit_tiny_ls, img_size: 160}\n", "", 1) + """\
label_smoothing: 0.1
augment: {crop_scale: [0.5, 1.0], rand_augment: rand-m9-mstd0.5-inc1, random_erasing: 0.25,
          mixup: 0.8, cutmix: 1.0, repeated_aug: 3}
model: {name: deit_tiny_ls, img_size: 160, drop_path_rate: 0.1}
"""


def _tables(results, run):
    folder = results / "runs" / run
    return pd.read_csv(folder / "steps.csv"), pd.read_csv(folder / "epochs.csv")


def test_smoke_pipeline_end_to_end(photos_dir, tmp_path, capsys):
    crops, results = tmp_path / "crops", tmp_path / "results"
    assert main(["crop", "--data", str(photos_dir), "--out", str(crops)]) == 0
    recipes = [str(REPO / "recipes/seed_adamw.yaml"), str(REPO / "recipes/resnet18_sgd.yaml")]
    assert main(["run", *recipes, "--crops", str(crops), "--results", str(results), "--profile", "smoke",
                 "--no-progress"]) == 0
    assert main(["report", "--results", str(results), "--recipes", str(REPO / "recipes")]) == 0

    for run in ("seed_adamw-smoke-seed0", "resnet18_sgd-smoke-seed0"):
        folder = results / "runs" / run
        info = json.loads((folder / "run.json").read_text())
        assert info["status"] == "finished"
        assert info["profile"] == "smoke"
        assert info["data"]["num_classes"] == 4
        assert info["env"]["packages"]["torch"] == torch.__version__.split("+")[0]
        assert {"epochs", "batch_size", "max_people"} <= set(info["resolved"]["changes"])
        steps, epochs = _tables(results, run)
        assert list(steps.columns[:6]) == ["epoch", "step", "lr", "loss", "grad_norm", "images"]
        assert (steps["images_per_s"] > 0).all()
        assert (steps["data_ms"] >= 0).all()
        assert len(epochs) == 1
        assert 0 <= epochs.loc[0, "val_top1"] <= epochs.loc[0, "val_top5"] <= 100
        assert 0 <= epochs.loc[0, "val_balanced_acc"] <= 100
        assert (folder / "checkpoints" / "epoch_000.pt").is_file()

    report = (results / "REPORT.md").read_text()
    for heading in ("## Accuracy per run", "## Throughput per model", "## Claims: does SGD fail where AdamW works?",
                    "## Paper recipes"):
        assert heading in report
    assert "seed_adamw-smoke-seed0" in report
    assert (results / "plots" / "train_loss.png").stat().st_size > 0
    assert (results / "plots" / "val_top1.png").stat().st_size > 0
    accuracy = pd.read_csv(results / "tables" / "accuracy.csv")
    assert set(accuracy["run"]) == {"seed_adamw-smoke-seed0", "resnet18_sgd-smoke-seed0"}


def test_same_seed_gives_same_loss_curve(crops_dir, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "tiny_mix.yaml", MIXUP_RA_RECIPE))
    for name in ("a", "b"):
        train_recipe(recipe, crops_dir, tmp_path / name, profile="full", seed=3, progress=False)
    steps_a, epochs_a = _tables(tmp_path / "a", "tiny_mix-full-seed3")
    steps_b, epochs_b = _tables(tmp_path / "b", "tiny_mix-full-seed3")
    assert len(steps_a) > 2
    assert steps_a["loss"].tolist() == steps_b["loss"].tolist()
    assert epochs_a["val_loss"].tolist() == epochs_b["val_loss"].tolist()


def test_resume_matches_uninterrupted_run(crops_dir, tmp_path, monkeypatch):
    recipe = load_recipe(write_recipe(tmp_path / "tiny_mix.yaml", MIXUP_RA_RECIPE))
    train_recipe(recipe, crops_dir, tmp_path / "straight", profile="full", seed=1, progress=False)

    real_epoch = train_module.train_one_epoch

    def stop_in_second_epoch(*args, **kwargs):
        if args[7] == 1:  # the epoch argument
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", stop_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_recipe(recipe, crops_dir, tmp_path / "resumed", profile="full", seed=1, progress=False)
    run_dir = tmp_path / "resumed" / "runs" / "tiny_mix-full-seed1"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "stopped"

    with pytest.raises(RunExistsError, match="pass --resume"):
        train_recipe(recipe, crops_dir, tmp_path / "resumed", profile="full", seed=1, progress=False)

    monkeypatch.setattr(train_module, "train_one_epoch", real_epoch)
    info = train_recipe(recipe, crops_dir, tmp_path / "resumed", profile="full", seed=1, progress=False,
                        resume=True)
    assert info["status"] == "finished"
    steps_a, epochs_a = _tables(tmp_path / "straight", "tiny_mix-full-seed1")
    steps_b, epochs_b = _tables(tmp_path / "resumed", "tiny_mix-full-seed1")
    assert steps_a["loss"].tolist() == steps_b["loss"].tolist()
    for column in ("train_loss", "val_loss", "val_top1", "val_top5", "val_balanced_acc"):
        assert epochs_a[column].tolist() == epochs_b[column].tolist(), column


def test_finished_run_not_retrained(crops_dir, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "tiny.yaml", TINY_RECIPE.replace("epochs: 2", "epochs: 1")))
    first = train_recipe(recipe, crops_dir, tmp_path / "r", profile="full", progress=False)
    steps_file = tmp_path / "r" / "runs" / "tiny-full-seed0" / "steps.csv"
    before = steps_file.stat().st_mtime_ns
    second = train_recipe(recipe, crops_dir, tmp_path / "r", profile="full", progress=False, resume=True)
    assert second["finished"] == first["finished"]
    assert steps_file.stat().st_mtime_ns == before


def test_changed_recipe_is_not_reused(crops_dir, tmp_path):
    path = write_recipe(tmp_path / "tiny.yaml", TINY_RECIPE.replace("epochs: 2", "epochs: 1"))
    train_recipe(load_recipe(path), crops_dir, tmp_path / "r", profile="full", progress=False)
    write_recipe(path, TINY_RECIPE.replace("epochs: 2", "epochs: 1").replace("lr: 1.0e-3", "lr: 2.0e-3"))
    with pytest.raises(RunExistsError, match="was trained with other recipe values"):
        train_recipe(load_recipe(path), crops_dir, tmp_path / "r", profile="full", progress=False, resume=True)


def test_malformed_run_json_is_one_line(crops_dir, tmp_path, capsys):
    path = write_recipe(tmp_path / "tiny.yaml", TINY_RECIPE.replace("epochs: 2", "epochs: 1"))
    info_file = tmp_path / "r" / "runs" / "tiny-full-seed0" / "run.json"
    info_file.parent.mkdir(parents=True)
    info_file.write_text("{}")
    args = ["train", str(path), "--crops", str(crops_dir), "--results", str(tmp_path / "r"), "--profile", "full"]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == (f"facedeit: error: {info_file}: run: missing key; remove the run "
                                               "folder or train it again")


def test_non_finite_loss_diverges_run(crops_dir, tmp_path, monkeypatch, capsys):
    real_loss = train_module.build_train_loss

    def loss_that_turns_nan(run):
        loss = real_loss(run)
        if run.recipe.name != "blows_up":
            return loss
        calls = []

        def nan_on_second_call(logits, targets):
            calls.append(1)
            value = loss(logits, targets)
            return value * float("nan") if len(calls) >= 2 else value

        return nan_on_second_call

    monkeypatch.setattr(train_module, "build_train_loss", loss_that_turns_nan)
    bad = write_recipe(tmp_path / "blows_up.yaml", TINY_RECIPE)
    good = write_recipe(tmp_path / "fine.yaml", TINY_RECIPE.replace("epochs: 2", "epochs: 1"))
    code = main(["run", str(bad), str(good), "--crops", str(crops_dir), "--results", str(tmp_path / "r"),
                 "--profile", "full", "--no-progress"])
    assert code == 0
    bad_info = json.loads((tmp_path / "r/runs/blows_up-full-seed0/run.json").read_text())
    assert bad_info["status"] == "diverged"
    assert bad_info["diverged_at_step"] == 2  # the second update, as steps.csv numbers it
    bad_steps = pd.read_csv(tmp_path / "r/runs/blows_up-full-seed0/steps.csv")
    assert bad_steps["step"].tolist() == [1]
    assert json.loads((tmp_path / "r/runs/fine-full-seed0/run.json").read_text())["status"] == "finished"
    assert "blows_up-full-seed0: diverged" in capsys.readouterr().out

    shutil.rmtree(tmp_path / "r/runs/blows_up-full-seed0")
    assert main(["train", str(bad), "--crops", str(crops_dir), "--results", str(tmp_path / "r"),
                 "--profile", "full", "--no-progress"]) == 3


def test_recipe_typo_stops_before_training(crops_dir, tmp_path, capsys):
    good = write_recipe(tmp_path / "good.yaml", TINY_RECIPE)
    bad = write_recipe(tmp_path / "bad.yaml", TINY_RECIPE + "mixupp: 0.8\n")
    code = main(["run", str(good), str(bad), "--crops", str(crops_dir), "--results", str(tmp_path / "r")])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"facedeit: error: {bad}: mixupp: unknown key " \
        "(allowed: augment, batch_size, clip_grad, description, epochs, label_smoothing, model, optimizer, schedule, source)"
    assert not (tmp_path / "r").exists()


def test_train_without_crops_one_line(tmp_path, capsys):
    code = main(["train", str(REPO / "recipes/seed_adamw.yaml"), "--crops", str(tmp_path / "none"),
                 "--results", str(tmp_path / "r")])
    assert code == 2
    assert "split.csv: not found; run `facedeit crop` first" in capsys.readouterr().err


def test_split_csv_without_columns_is_named(tmp_path, capsys):
    crops = tmp_path / "crops"
    crops.mkdir()
    (crops / "split.csv").write_text("a,b\n1,2\n")
    code = main(["train", str(REPO / "recipes/seed_adamw.yaml"), "--crops", str(crops), "--results", str(tmp_path / "r")])
    assert code == 2
    assert "split.csv: missing columns ['crop', 'label', 'person', 'split']" in capsys.readouterr().err
