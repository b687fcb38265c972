"""Run folders -> results/REPORT.md, results/tables/*.csv, results/plots/*.png.

Reads only what training wrote; it never trains.
"""

import logging
from pathlib import Path

import pandas as pd

from facedeit.bench_table import benchmark_section
from facedeit.claim_plan import load_plan
from facedeit.claims import check_plan_criteria, load_criteria
from facedeit.claims_report import claims_tables, plot_claims, render_claims
from facedeit.io import write_csv_atomic, write_text_atomic
from facedeit.paper_table import paper_table
from facedeit.runs import damaged_files, read_run_info

log = logging.getLogger(__name__)

BASELINE_MODEL = "resnet18"


def load_runs(results_dir: Path) -> list[dict]:
    """Read every run folder under `<results_dir>/runs`: run.json plus its CSVs as DataFrames."""
    runs = []
    for info_file in sorted((Path(results_dir) / "runs").glob("*/run.json")):
        run_dir = info_file.parent
        info = read_run_info(info_file)

        def table(name):
            path = run_dir / name
            return pd.read_csv(path) if path.is_file() and path.stat().st_size > 1 else pd.DataFrame()

        steps, epochs = table("steps.csv"), table("epochs.csv")
        runs.append({"info": info, "steps": steps, "epochs": epochs, "evals": table("eval_batches.csv"),
                     "damaged": damaged_files(info, len(steps), len(epochs))})
    return runs


def accuracy_table(runs: list[dict]) -> pd.DataFrame:
    rows = []
    for run in runs:
        info, epochs = run["info"], run["epochs"]
        row = {"run": info["run"], "model": info["model"]["name"], "profile": info["profile"],
               "status": info["status"], "epochs": info.get("epochs_done", 0),
               "device": info["env"]["device_name"]}
        if not run["steps"].empty:
            row.update(images_seen=int(run["steps"]["images"].sum()))
        if not epochs.empty:
            row.update(train_minutes=epochs["train_s"].sum() / 60)
            last = epochs.iloc[-1]
            best = epochs.loc[epochs["val_top1"].idxmax()]
            row.update(final_top1=last["val_top1"], best_top1=best["val_top1"], best_epoch=int(best["epoch"]),
                       final_top5=last["val_top5"], top5_k=int(last.get("top5_k", 5)), final_balanced_acc=last["val_balanced_acc"],
                       final_val_loss=last["val_loss"], final_train_loss=last["train_loss"])
        rows.append(row)
    table = pd.DataFrame(rows)
    # Nullable integers, so that a run without a finished epoch does not turn the column into floats.
    for column in ("epochs", "images_seen", "best_epoch", "top5_k"):
        if column in table:
            table[column] = table[column].astype("Int64")
    return table


def _spread(frame: pd.DataFrame, keys: list[str], prefix: str) -> pd.DataFrame:
    """Median, 10th and 90th percentile and count of images_per_s per group."""
    grouped = frame.groupby(keys)["images_per_s"]
    return grouped.agg(**{
        f"{prefix}_images_per_s_median": "median",
        f"{prefix}_images_per_s_p10": lambda s: s.quantile(0.1),
        f"{prefix}_images_per_s_p90": lambda s: s.quantile(0.9),
        f"{prefix}_batches": "size",
    }).reset_index()


def throughput_table(runs: list[dict]) -> pd.DataFrame:
    """Train and eval images/s per batch, pooled over the runs of each (model, device, batch size).

    Warm-up updates and short batches are left out, so every figure is a
    full batch. Eval figures use each group's largest eval batch size.
    """
    keys = ["model", "device", "batch_size"]
    train_parts, eval_parts = [], []
    for run in runs:
        info, steps, evals = run["info"], run["steps"], run["evals"]
        key = {"model": info["model"]["name"], "device": info["env"]["device_name"],
               "batch_size": info["resolved"]["batch_size"]}
        if not steps.empty:
            full = steps[~steps["warmup"].astype(bool) & (steps["images"] == key["batch_size"])]
            train_parts.append(full.assign(**key)[keys + ["images_per_s"]])
        if not evals.empty:
            eval_parts.append(evals.assign(**key)[keys + ["images_per_s", "images"]])
    if not train_parts or not eval_parts:
        return pd.DataFrame()
    evals = pd.concat(eval_parts)
    evals = evals[evals["images"] == evals.groupby(keys)["images"].transform("max")]
    table = _spread(pd.concat(train_parts), keys, "train").merge(_spread(evals, keys, "eval"), on=keys, how="outer")
    for phase in ("train", "eval"):
        column = f"{phase}_images_per_s_median"
        base = table[table["model"] == BASELINE_MODEL].set_index(["device", "batch_size"])[column]
        table[f"{phase}_vs_{BASELINE_MODEL}"] = [
            row[column] / base.get((row["device"], row["batch_size"]), float("nan")) for _, row in table.iterrows()
        ]
    return table


def plot_curves(runs: list[dict], plots_dir: Path) -> list[Path]:
    """Draw train loss against update and val top-1 against epoch, one line per seed-0 recipe run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    plots_dir.mkdir(parents=True, exist_ok=True)
    sns.set_theme(style="whitegrid")
    # Seed 0 of each recipe file only: the claims section draws the other seeds and the variants.
    runs = [r for r in runs if r["info"].get("seed") == 0 and "." not in r["info"]["recipe"]]
    step_frames = [r["steps"].assign(run=r["info"]["run"]) for r in runs if not r["steps"].empty]
    epoch_frames = [r["epochs"].assign(run=r["info"]["run"]) for r in runs if not r["epochs"].empty]
    if not step_frames or not epoch_frames:
        log.warning("no run has a finished epoch; the curves are not drawn")
        return []
    steps, epochs = pd.concat(step_frames), pd.concat(epoch_frames)
    # A rolling mean over 20 updates makes the per-batch loss readable; the raw values are in steps.csv.
    steps["loss_smoothed"] = steps.groupby("run")["loss"].transform(lambda s: s.rolling(20, min_periods=1).mean())

    paths = []
    fig, ax = plt.subplots(figsize=(9, 5))
    sns.lineplot(data=steps, x="step", y="loss_smoothed", hue="run", ax=ax, linewidth=1.2)
    ax.set(xlabel="update", ylabel="train loss (rolling mean of 20 updates)", title="Train loss")
    ax.legend(fontsize=8)
    paths.append(_save(fig, plots_dir / "train_loss.png"))

    fig, ax = plt.subplots(figsize=(9, 5))
    sns.lineplot(data=epochs, x="epoch", y="val_top1", hue="run", marker="o", ax=ax)
    ax.set(xlabel="epoch", ylabel="val top-1 (%)", title="Val top-1")
    ax.legend(fontsize=8)
    paths.append(_save(fig, plots_dir / "val_top1.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def _markdown(frame: pd.DataFrame, floatfmt: str = ".2f") -> str:
    if frame.empty:
        return "_no runs_\n"
    return frame.to_markdown(index=False, floatfmt=floatfmt) + "\n"


def write_report(results_dir: Path, recipes_dir: Path = Path("recipes"),
                 criteria_file: Path = Path("claims/criteria.yaml"), plan_file: Path = Path("claims/plan.yaml")) -> Path:
    """Write REPORT.md, its tables and plots from `<results_dir>/runs`; return the report's path.

    The claims section needs `plan_file` and `criteria_file`; without the plan
    file the report leaves that section out, with a line in its place.
    """
    results_dir = Path(results_dir)
    runs = load_runs(results_dir)
    if not runs:
        raise FileNotFoundError(f"{results_dir / 'runs'}: no run folders with a run.json; train a recipe first")
    tables_dir, plots_dir = results_dir / "tables", results_dir / "plots"

    tables = {"accuracy": accuracy_table(runs), "throughput": throughput_table(runs),
              "paper_recipes": paper_table(recipes_dir, runs)}
    claims_text = f"## Claims\n\n_No claims plan at `{plan_file}`; pass `--plan` to add this section._\n"
    if Path(plan_file).is_file():
        plan, criteria = load_plan(plan_file), load_criteria(criteria_file)
        check_plan_criteria(plan, criteria)
        found = claims_tables(plan, runs, criteria)
        tables.update(found)
        plots = plot_claims(plan, runs, found, plots_dir)
        claims_text = render_claims(plan, runs, found, criteria, Path(criteria_file), results_dir, plots)
    for name, frame in tables.items():
        write_csv_atomic(tables_dir / f"{name}.csv", frame)
    plot_curves(runs, plots_dir)

    text = _render(runs, tables["accuracy"], tables["throughput"], tables["paper_recipes"], claims_text)
    benchmarks = benchmark_section(results_dir)
    if benchmarks:
        text += "\n" + benchmarks.rstrip() + "\n"
    path = results_dir / "REPORT.md"
    write_text_atomic(path, text)
    return path


def _damaged_lines(runs: list[dict]) -> list[str]:
    damaged = [r for r in runs if r.get("damaged")]
    for run in damaged:
        log.warning("%s: finished, but %s", run["info"]["run"], run["damaged"])
    if not damaged:
        return []
    listed = "; ".join(f"`{r['info']['run']}` ({r['damaged']})" for r in damaged)
    return [f"**{len(damaged)} finished run folder(s) lack rows of their CSV files**: {listed}. Their numbers below "
            "are incomplete, and the claims section does not judge them.", ""]


def _render(runs, accuracy, throughput, paper, claims_text: str) -> str:
    first = runs[0]["info"]
    data = first["data"]
    splits = {r["info"]["data"]["split_sha256"] for r in runs}
    lines = [
        "# facedeit report",
        "",
        "Generated by `facedeit report` from the run folders in `runs/`; every figure below is read from them.",
        "",
        "## Data",
        "",
        f"{data['num_classes']} people, {data['train_images']} train and {data['val_images']} val face crops "
        f"(160x160, MTCNN) in the first run's split (`{first['run']}`). Chance top-1 is {data['chance_top1']:.2f}%; "
        f"always guessing the most frequent person gives {data['majority_top1']:.2f}% val top-1."
        + (f" NOTE: the runs here used {len(splits)} different splits; compare only runs of one split "
           "(`data` in each run.json)." if len(splits) > 1 else ""),
        "",
        *_damaged_lines(runs),
        "## Curves",
        "",
        "![train loss](plots/train_loss.png)",
        "",
        "![val top-1](plots/val_top1.png)",
        "",
        "## Accuracy per run",
        "",
        "Accuracies in percent on the val split; `final` is the last epoch, `best` the best epoch; `final_top5` is top-`top5_k` when there are fewer than 5 people "
        "(picked on the same val split, so it is optimistic).",
        "",
        _markdown(accuracy),
        "## Throughput per model",
        "",
        "Images/s of one batch: a train batch is forward, backward and optimizer step; an eval batch is a forward "
        "pass under inference_mode. Median with the 10th-90th percentile range over all full batches of the "
        "runs, warm-up updates left out. Ratios divide medians by ResNet18's on the same device and batch size. "
        "On a GPU the timing uses CUDA events; on the CPU perf_counter.",
        "",
        _markdown(throughput, ".3g"),
    ]
    lines += [claims_text]
    lines += [
        "## Paper recipes (arXiv 2012.12877, Table 9)",
        "",
        "Generated from `recipes/vit_b_paper.yaml` and `recipes/deit_b_paper.yaml`; the `used` columns are the "
        "values the latest run of each tiny recipe trained with (after its profile).",
        "",
        _markdown(paper, "g"),
        "## Departures from the recipes",
        "",
    ]
    for run in runs:
        info = run["info"]
        if info.get("departures"):
            lines.append(f"- `{info['run']}`: " + "; ".join(info["departures"]))
    env = first["env"]
    lines += ["", "## Environment", "",
              f"{env['device_name']}; python {env['python']}; "
              + ", ".join(f"{k} {v}" for k, v in env["packages"].items())
              + f"; git {env['git_commit']}.", ""]
    return "\n".join(lines)
