"""The rows of Table 9 of the DeiT paper (arXiv 2012.12877), generated from recipes and runs."""

import dataclasses
from pathlib import Path

import pandas as pd

from facedeit.recipes import load_recipe

PAPER_COLUMNS = (("ViT-B", "vit_b_paper"), ("DeiT-B", "deit_b_paper"))


def _dash(value):
    """Return '-' for an ingredient that is off, as the paper's table writes it."""
    return "-" if value is None or value is False or value == 0 else value


def table9_rows(recipe: dict, used: dict | None = None) -> dict:
    """Map a recipe (as a dict) to the Table 9 rows; `used` adds the resolved epochs, batch and lr."""
    opt, schedule, aug, model = recipe["optimizer"], recipe["schedule"], recipe["augment"], recipe["model"]
    rule = opt["lr"]
    if used is not None:
        lr = f"{used['lr']:.3g}"
    elif rule["per_batch"] is None:
        lr = f"{rule['base']:g}"
    else:
        lr = f"{rule['base']:g} x batch / {rule['per_batch']}"
    return {
        "epochs": used["epochs"] if used else recipe["epochs"],
        "batch size": used["batch_size"] if used else recipe["batch_size"],
        "optimizer": "AdamW" if opt["name"] == "adamw" else "SGD",
        "learning rate": lr,
        "lr decay": schedule["name"],
        "weight decay": opt["weight_decay"],
        "warmup epochs": round(used["warmup_epochs"], 3) if used else schedule["warmup_epochs"],
        "label smoothing": _dash(recipe["label_smoothing"]),
        "dropout": _dash(model["dropout"]),
        "stochastic depth": _dash(model["drop_path_rate"]),
        "repeated aug": "-" if aug["repeated_aug"] <= 1 else f"x{aug['repeated_aug']}",
        "gradient clipping": _dash(recipe["clip_grad"]),
        "RandAugment": "-" if not aug["rand_augment"] else aug["rand_augment"],
        "mixup": _dash(aug["mixup"]),
        "cutmix": _dash(aug["cutmix"]),
        "random erasing": _dash(aug["random_erasing"]),
    }


def paper_table(recipes_dir: Path, runs: list[dict]) -> pd.DataFrame:
    """Build one row per Table 9 row, with each paper column's recipe value and what its tiny run used."""
    columns = {}
    for label, stem in PAPER_COLUMNS:
        path = Path(recipes_dir) / f"{stem}.yaml"
        if not path.is_file():
            continue
        columns[f"{label} (recipe)"] = table9_rows(dataclasses.asdict(load_recipe(path)))
        tiny_runs = [r["info"] for r in runs if r["info"]["recipe"] == f"{stem}_tiny"]
        if tiny_runs:
            latest = max(tiny_runs, key=lambda info: info["started"])
            resolved = latest["resolved"]
            columns[f"{label} (used: {latest['run']})"] = table9_rows(resolved["recipe"], resolved)
    if not columns:
        return pd.DataFrame()
    frame = pd.DataFrame(columns)
    frame.index.name = "row"
    return frame.reset_index().astype(str)
