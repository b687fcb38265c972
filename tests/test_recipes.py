import dataclasses
from pathlib import Path

import pytest

from facedeit.cli import main
from facedeit.recipes import PROFILES, RecipeError, load_recipe, resolve
from tests.conftest import REPO, TINY_RECIPE, write_recipe

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipes_load_under_profiles(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    for profile in PROFILES:
        run = resolve(recipe, profile)
        assert run.epochs <= recipe.epochs
        assert run.lr > 0


def test_team_recipe_values():
    adamw = load_recipe(REPO / "recipes/seed_adamw.yaml")
    sgd = load_recipe(REPO / "recipes/seed_sgd.yaml")
    assert (adamw.optimizer.name, adamw.optimizer.lr.base, adamw.optimizer.betas) == ("adamw", 3e-3, (0.9, 0.999))
    assert (adamw.optimizer.eps, adamw.optimizer.weight_decay) == (1e-8, 0.01)
    assert (adamw.schedule.name, adamw.epochs, adamw.batch_size) == ("cosine", 25, 32)
    assert (sgd.optimizer.name, sgd.optimizer.lr.base, sgd.optimizer.momentum) == ("sgd", 1e-2, 0.9)
    assert (sgd.schedule.name, sgd.schedule.step_epochs, sgd.schedule.gamma) == ("step", 7, 0.1)
    for name in ("resnet18_sgd", "resnet18_adamw"):
        baseline = load_recipe(REPO / f"recipes/{name}.yaml")
        assert baseline.model.name == "resnet18"


@pytest.mark.parametrize("text, key", [
    (TINY_RECIPE + "epoch: 3\n", "epoch: unknown key"),
    (TINY_RECIPE.replace("weight_decay: 0.05", "weight_decay: 0.05, wd: 1"), "optimizer.wd: unknown key"),
    (TINY_RECIPE + "augment: {mixup: 0.8, cutmixx: 1.0}\n", "augment.cutmixx: unknown key"),
    (TINY_RECIPE.replace("lr: 1.0e-3", "lr: -1.0e-3"), "optimizer.lr.base: -0.001 must be greater than 0"),
    (TINY_RECIPE.replace("lr: 1.0e-3", "lr: fast"), "optimizer.lr.base: expected a number"),
    (TINY_RECIPE.replace("epochs: 2", "epochs: 2.5"), "epochs: expected an integer"),
    (TINY_RECIPE.replace("name: adamw", "name: adam"), "optimizer.name: invalid value 'adam'"),
    (TINY_RECIPE.replace("deit_tiny_ls", "vit_huge"), "model.name: invalid value 'vit_huge'"),
    (TINY_RECIPE + "label_smoothing: 1.5\n", "label_smoothing: 1.5 is outside [0, 1]"),
    (TINY_RECIPE.replace("weight_decay: 0.05", "weight_decay: 0.05, betas: [1.5, 0.9]"), "optimizer.betas: (1.5, 0.9) is outside [0, 1)"),
    (TINY_RECIPE.replace("name: adamw", "name: sgd, nesterov: true, momentum: 0"), "optimizer.nesterov: Nesterov momentum needs"),
    (TINY_RECIPE + "augment: {rand_augment: rand-zz-foo}\n", "augment.rand_augment: 'rand-zz-foo' is not a timm RandAugment string"),
    (TINY_RECIPE.replace("batch_size: 8", "batch_size: 7") + "augment: {mixup: 0.8}\n", "batch_size: mixup and cutmix need an even batch"),
    (TINY_RECIPE.replace("name: cosine", "name: step"), "schedule.step_epochs: required"),
    (TINY_RECIPE.replace("warmup_epochs: 0.5", "warmup_epochs: 2"), "schedule.warmup_epochs: 2.0 is not below epochs"),
    (TINY_RECIPE.replace("epochs: 2\n", ""), "epochs: missing required key"),
    ("name: x\n" + TINY_RECIPE, "name: not a recipe key"),
    ("- just\n- a list\n", "expected a mapping"),
    ("model: {name: [unclosed\n", "invalid YAML"),
])
def test_bad_recipe_names_file_and_key(tmp_path, text, key):
    path = write_recipe(tmp_path / "bad.yaml", text)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ")
    assert key in message
    assert "\n" not in message


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_exponent_without_dot_parses(tmp_path):
    # PyYAML reads 3e-3 as the string "3e-3".
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", TINY_RECIPE.replace("1.0e-3", "3e-3")))
    assert recipe.optimizer.lr.base == pytest.approx(3e-3)


def test_recipe_is_frozen():
    recipe = load_recipe(REPO / "recipes/seed_adamw.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.epochs = 1


def test_quick_profile_rescales_lr():
    recipe = load_recipe(REPO / "recipes/deit_b_paper.yaml")
    run = resolve(recipe, "quick")
    assert run.batch_size == 64
    assert run.lr == pytest.approx(0.0005 * 64 / 512)
    assert run.epochs == PROFILES["quick"].max_epochs
    assert run.warmup_epochs == pytest.approx(5 * run.epochs / 300)
    assert run.changes["lr"] == {"recipe": pytest.approx(0.0005 * 1024 / 512), "used": pytest.approx(run.lr)}
    assert run.changes["batch_size"] == {"recipe": 1024, "used": 64}
    assert set(run.changes) >= {"epochs", "batch_size", "lr", "warmup_epochs"}


def test_full_profile_changes_nothing():
    run = resolve(load_recipe(REPO / "recipes/vit_b_paper.yaml"), "full")
    assert run.changes == {}
    assert (run.epochs, run.batch_size, run.lr, run.warmup_epochs) == (300, 4096, 3e-3, 3.4)


def test_step_length_scales_with_epochs():
    run = resolve(load_recipe(REPO / "recipes/seed_sgd.yaml"), "quick")
    assert run.step_epochs == pytest.approx(7 * run.epochs / 25)


def test_unknown_profile():
    with pytest.raises(RecipeError, match="unknown profile 'fast'"):
        resolve(load_recipe(REPO / "recipes/seed_sgd.yaml"), "fast")


def test_cli_recipe_show_prints_resolved_values(capsys):
    assert main(["recipe", "show", str(REPO / "recipes/deit_b_paper.yaml"), "--profile", "quick"]) == 0
    out = capsys.readouterr().out
    assert '"lr": 6.25e-05' in out
    assert '"profile": "quick"' in out


def test_cli_recipe_check_bad_input(tmp_path, capsys):
    good = REPO / "recipes/seed_sgd.yaml"
    assert main(["recipe", "check", str(good), "--profile", "quick"]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {good} (deit_tiny_ls, profile quick: 3 epochs")
    assert main(["recipe", "check", str(good), "--profile", "bogus"]) == 2
    assert "unknown profile 'bogus'" in capsys.readouterr().err
    bad = write_recipe(tmp_path / "bad.yaml", TINY_RECIPE + "label_smoothing: 2\n")
    assert main(["recipe", "check", str(good), str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"facedeit: error: {bad}: label_smoothing")
    assert captured.out == ""   # every file is checked before any "ok" line


@pytest.mark.parametrize("text, message", [
    (TINY_RECIPE.replace("img_size: 160}", "img_size: 160, checkpoint: /nonexistent/start.pt}"),
     "model.checkpoint: file not found: /nonexistent/start.pt"),
    (TINY_RECIPE + "epochs: 25\n", "invalid YAML at line 6, column 1: duplicate key 'epochs'"),
])
def test_cli_recipe_check_rejects(tmp_path, capsys, text, message):
    path = write_recipe(tmp_path / "recipe.yaml", text)
    assert main(["recipe", "check", str(path)]) == 2
    assert capsys.readouterr().err.strip() == f"facedeit: error: {path}: {message}"


def test_cli_recipe_check_folder(tmp_path, capsys):
    assert main(["recipe", "check", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"facedeit: error: {tmp_path}: is a folder, not a recipe file"


def test_cli_recipe_check_accumulation(capsys):
    assert main(["recipe", "check", str(REPO / "recipes/seed_sgd.yaml"), "--accum-steps", "3"]) == 2
    assert "batch_size 32 is not divisible by 1 processes x 3" in capsys.readouterr().err


def test_cli_bad_recipe_one_line(tmp_path, capsys):
    path = write_recipe(tmp_path / "typo.yaml", TINY_RECIPE + "optimiser: {}\n")
    assert main(["recipe", "show", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"facedeit: error: {path}: optimiser: unknown key (allowed: augment, batch_size, clip_grad, " \
                  "description, epochs, label_smoothing, model, optimizer, schedule, source)"


def test_yaml_error_names_line(tmp_path):
    path = write_recipe(tmp_path / "broken.yaml", "epochs: 2\nmodel:\n name: x\n  bad: [\n")
    with pytest.raises(RecipeError, match=r"invalid YAML at line \d+, column \d+"):
        load_recipe(path)


def test_empty_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="the recipe file is empty"):
        load_recipe(write_recipe(tmp_path / "empty.yaml", ""))


def test_overrides_make_a_variant():
    from facedeit.recipes import load_recipe

    recipe = load_recipe(REPO / "recipes" / "seed_sgd.yaml", {"optimizer.lr.base": 0.1, "label_smoothing": 0.1}, "v")
    assert recipe.name == "seed_sgd.v"
    assert recipe.optimizer.lr.base == 0.1
    assert recipe.label_smoothing == 0.1
    assert recipe.optimizer.momentum == 0.9


def test_overrides_need_variant_and_known_keys():
    from facedeit.recipes import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="variant"):
        load_recipe(REPO / "recipes" / "seed_sgd.yaml", {"label_smoothing": 0.1})
    with pytest.raises(RecipeError, match="schedule.warmup: unknown key"):
        load_recipe(REPO / "recipes" / "seed_sgd.yaml", {"schedule.warmup": 1}, "v")
    with pytest.raises(RecipeError, match="label_smoothing"):
        load_recipe(REPO / "recipes" / "seed_sgd.yaml", {"label_smoothing": 2.0}, "v")
