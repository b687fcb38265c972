"""The claims section of REPORT.md, its tables and plots, drawn from saved runs only."""

import json
from pathlib import Path

import pandas as pd

from facedeit.claim_plan import Plan
from facedeit.claims import (DOES_NOT_HOLD, FAILS, HOLDS, INCONCLUSIVE, WORKS, Criteria, ablation_table, claim_summary,
                             plan_outcomes, sweep_table)
from facedeit.runs import file_sha256

# The reading of each sweep verdict for the team's claim.
SWEEP_READING = {
    HOLDS: "SGD fails at every lr tried, not only at the team's settings.",
    DOES_NOT_HOLD: "SGD learns at one or more of these lrs, so its failure is tied to the team's settings.",
    INCONCLUSIVE: "The sweep does not settle whether SGD fails only at the team's settings.",
}

# Rolling window of the train-loss curves, in updates. The raw losses are in steps.csv.
SMOOTH_UPDATES = 20


def claims_tables(plan: Plan, runs: list[dict], criteria: Criteria) -> dict[str, pd.DataFrame]:
    outcomes = plan_outcomes(plan, runs, criteria)
    return {"claims_runs": outcomes, "claims_summary": claim_summary(plan, outcomes, criteria),
            "claims_sweep": sweep_table(outcomes), "claims_ablation": ablation_table(outcomes)}


def _seconds(run: dict) -> float:
    epochs = run["epochs"]
    return float(epochs["train_s"].sum()) if not epochs.empty and "train_s" in epochs else 0.0


def _curves(plan: Plan, runs: list[dict], outcomes: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train loss against epoch and val top-1 against epoch for the judged claim runs, one row per point."""
    by_name = {r["info"]["run"]: r for r in runs}
    judged = outcomes[(outcomes["group"] == "claims") & outcomes["outcome"].notna()] if not outcomes.empty else outcomes
    steps, epochs = [], []
    for row in judged.itertuples():
        run = by_name[row.run]
        per_epoch = run["info"]["schedule_updates"]["steps_per_epoch"]
        if not run["steps"].empty:
            frame = run["steps"][["step", "loss"]].copy()
            # Runs of one recipe share their update count, so the x values line up across seeds.
            frame["epoch"] = frame["step"] / per_epoch
            frame["loss"] = frame["loss"].rolling(SMOOTH_UPDATES, min_periods=1).mean()
            steps.append(frame.assign(recipe=run["info"]["recipe"], seed=row.seed))
        if not run["epochs"].empty:
            frame = run["epochs"][["epoch", "val_top1"]].copy()
            frame["epoch"] = frame["epoch"] + 1
            epochs.append(frame.assign(recipe=run["info"]["recipe"], seed=row.seed))
    return (pd.concat(steps) if steps else pd.DataFrame(), pd.concat(epochs) if epochs else pd.DataFrame())


def plot_claims(plan: Plan, runs: list[dict], tables: dict, plots_dir: Path) -> list[str]:
    """Draw the claim curves with a band over seeds, the lr sweep and the ablation bars; return file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    from facedeit.report import _save

    sns.set_theme(style="whitegrid")
    plots_dir.mkdir(parents=True, exist_ok=True)
    outcomes = tables["claims_runs"]
    majority = outcomes["majority_top1"].dropna() if "majority_top1" in outcomes else pd.Series(dtype=float)
    written = []

    steps, epochs = _curves(plan, runs, outcomes)
    if not steps.empty:
        fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
        # The band is the range over seeds (min to max), the line their mean.
        sns.lineplot(data=steps, x="epoch", y="loss", hue="recipe", errorbar=("pi", 100), ax=left, linewidth=1.2)
        left.set(xlabel="epoch", ylabel=f"train loss (rolling mean of {SMOOTH_UPDATES} updates)",
                 title="Train loss, mean and range over seeds")
        # Dashes and markers per recipe keep lines that coincide (several at the majority rate) apart.
        sns.lineplot(data=epochs, x="epoch", y="val_top1", hue="recipe", style="recipe", markers=True,
                     errorbar=("pi", 100), ax=right)
        if len(majority):
            right.axhline(majority.iloc[0], color="grey", linestyle="--", label="majority class")
        right.set(xlabel="epoch", ylabel="val top-1 (%)", title="Val top-1, mean and range over seeds")
        for ax in (left, right):
            ax.legend(fontsize=8)
        written.append(_save(fig, plots_dir / "claims_curves.png").name)

    sweep = tables["claims_sweep"]
    if not sweep.empty and sweep["val_top1"].notna().any():
        fig, ax = plt.subplots(figsize=(8, 5))
        points = sweep[sweep["val_top1"].notna()].assign(warmup=lambda f: f["warmup_epochs"].map(lambda w: f"warmup {w:g} ep"))
        sns.lineplot(data=points, x="lr", y="val_top1", hue="warmup", marker="o", ax=ax)
        ax.set_xscale("log")
        if len(majority):
            ax.axhline(majority.iloc[0], color="grey", linestyle="--", label="majority class")
        adamw = _claim_mean(tables["claims_summary"], "team_adamw_works")
        if adamw is not None:
            ax.axhline(adamw, color="tab:red", linestyle=":", label="team AdamW, mean over seeds")
        ax.set(xlabel="SGD lr", ylabel="val top-1 (%)", title="DeiT-Ti-LS with SGD: lr sweep")
        ax.legend(fontsize=8)
        written.append(_save(fig, plots_dir / "claims_sweep.png").name)

    ablation = outcomes[(outcomes["group"] == "ablation") & outcomes["val_top1"].notna()]
    full = ablation[ablation["label"] == "full"].set_index("seed")["val_top1"].astype(float)
    if not ablation.empty and len(full):
        # Each dot is a run minus the full recipe's run at the same seed, as `vs_full` in the table,
        # and bars start at 0, so differences of a point or two stay visible.
        order = [label for label in dict.fromkeys(outcomes.loc[outcomes["group"] == "ablation", "label"]) if label != "full"]
        rows = ablation[(ablation["label"] != "full") & ablation["seed"].isin(full.index)]
        rows = rows.assign(vs_full=rows["val_top1"].astype(float) - rows["seed"].map(full))
        fig, ax = plt.subplots(figsize=(8, 5))
        sns.barplot(data=rows, y="label", x="vs_full", order=order, errorbar=("pi", 100), ax=ax, color="tab:blue", alpha=0.6)
        # No jitter, so that the plot is the same each time the report is drawn.
        sns.stripplot(data=rows, y="label", x="vs_full", order=order, ax=ax, color="black", size=4, jitter=False)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set(xlabel=f"val top-1 minus the full recipe's at the same seed, points\n"
                      f"(full recipe: mean {full.mean():.2f}%, {len(full)} seed(s))",
               ylabel="ingredient removed", title="DeiT-B column on DeiT-Ti-LS, one ingredient removed\n"
               "bar = mean, line = range, dots = seeds, empty row = no run yet")
        # At least one point either side, so that a row of zeros does not fill the axis with rounding noise.
        low, high = ax.get_xlim()
        ax.set_xlim(min(low, -1.0), max(high, 1.0))
        written.append(_save(fig, plots_dir / "claims_ablation.png").name)
    return written


def _prior_drop_text(runs: list[dict], judged: pd.DataFrame) -> str:
    """Say how far the loss falls by learning the label frequencies alone, from the runs' split.csv if it is there.

    The drop is given from ln(people) and from the judged runs' start losses,
    the scale of the criteria.
    """
    import math

    for run in runs:
        data = run["info"]["data"]
        split_file = Path(data.get("crops_dir", "")) / "split.csv"
        if split_file.is_file() and file_sha256(split_file) == data["split_sha256"]:
            split = pd.read_csv(split_file)
            shares = split.loc[split["split"] == "train", "person"].value_counts(normalize=True)
            entropy = float(-(shares * shares.map(math.log)).sum())
            drop = 1 - entropy / math.log(len(shares))
            text = (f": on this train split, {entropy:.2f} against ln {len(shares)} = {math.log(len(shares)):.2f}, "
                    f"a drop of {drop:.0%} with nothing learnt about faces")
            starts = pd.to_numeric(judged["start_loss"]).dropna() if not judged.empty else pd.Series(dtype=float)
            if len(starts):
                text += (f". Measured from a run's start loss, as the criteria do, the same drop is "
                         f"{1 - entropy / starts.median():.0%} at the median start loss ({starts.median():.2f}) and "
                         f"{1 - entropy / starts.min():.0%} to {1 - entropy / starts.max():.0%} over the judged runs' "
                         f"start losses ({starts.min():.2f} to {starts.max():.2f})")
            return text
    return ""


def _claim_mean(summary: pd.DataFrame, name: str) -> float | None:
    row = summary[summary["claim"] == name]
    if row.empty or pd.isna(row["val_top1_mean"].iloc[0]):
        return None
    return float(row["val_top1_mean"].iloc[0])


def _spread_text(row) -> str:
    if pd.isna(row.get("val_top1_mean")):
        return "n/a"
    text = f"{row['val_top1_mean']:.1f}"
    if not pd.isna(row.get("val_top1_std")):
        text += f" ± {row['val_top1_std']:.1f} [{row['val_top1_min']:.1f}, {row['val_top1_max']:.1f}]"
    return text


def _criteria_status(criteria_file: Path, lock_file: Path, runs: list[dict], plan_runs: set[str]) -> str:
    current = file_sha256(criteria_file)
    if not lock_file.is_file():
        return f"`{criteria_file}` (sha256 `{current[:12]}`) has not been recorded: `facedeit claims` records it before training."
    lock = json.loads(lock_file.read_text())
    earlier = sorted(r["info"]["run"] for r in runs
                     if r["info"]["run"] in plan_runs and r["info"].get("started", "") < lock["recorded"])
    text = (f"`{lock.get('file', criteria_file)}` (sha256 `{lock['sha256'][:12]}`) was recorded at {lock['recorded']}, "
            "when `facedeit claims` first ran.")
    if lock["sha256"] != current:
        text += (f" **The criteria used here (`{criteria_file}`, sha256 `{current[:12]}`) differ from it: the "
                 "verdicts below use values written after runs had been seen.**")
    else:
        text += " It has not changed since."
    if earlier:
        text += (f" {len(earlier)} planned run(s) had been trained before that ({', '.join(f'`{r}`' for r in earlier)}), "
                 "by `make reproduce`, so their numbers could be known when the thresholds were set.")
    return text


def render_claims(plan: Plan, runs: list[dict], tables: dict, criteria: Criteria, criteria_file: Path,
                  results_dir: Path, plots: list[str]) -> str:
    """Write the claims section of REPORT.md as Markdown: criteria, compute, verdicts, sweep, paper, ablation."""
    outcomes = tables["claims_runs"]
    judged = outcomes[outcomes["outcome"].notna()].drop_duplicates("run")
    lines = _intro_lines(plan, runs, outcomes, judged, criteria, criteria_file, results_dir)
    if "claims_curves.png" in plots:
        lines += ["![claims curves](plots/claims_curves.png)", ""]
    epochs = int(judged["epochs_done"].max()) if not judged.empty else 0
    lines += _summary_lines(plan, tables["claims_summary"], epochs)
    sweep_claim = next(c.name for c in plan.claims if c.group == "sweep")
    summary = tables["claims_summary"]
    lines += _sweep_lines(tables["claims_sweep"], summary.loc[summary["claim"] == sweep_claim, "verdict"].iloc[0], plots)
    lines += _paper_lines(plan, outcomes, tables["claims_summary"], tables["claims_ablation"], tables["claims_sweep"],
                          epochs)
    lines += _ablation_lines(tables["claims_ablation"], plots)
    missing = outcomes[outcomes["outcome"].isna()].drop_duplicates("run")
    if not missing.empty:
        counts = ", ".join(f"{n} {group}" for group, n in missing["group"].value_counts(sort=False).items())
        lines += [f"{len(missing)} planned run(s) have no result yet ({counts}); `tables/claims_runs.csv` lists "
                  "them with their status. `make claims` trains the missing ones and continues stopped ones; a "
                  "`changed` folder must be removed first, and a `damaged` one restored or removed.", ""]
    return "\n".join(lines)


def _intro_lines(plan, runs, outcomes, judged, criteria, criteria_file, results_dir) -> list[str]:
    by_name = {r["info"]["run"]: r for r in runs}
    hours = sum(_seconds(by_name[name]) for name in judged["run"]) / 3600
    devices = sorted({by_name[name]["info"]["env"]["device_name"] for name in judged["run"]})
    images = pd.to_numeric(judged["images_seen"]).dropna()
    compute = "nothing trained yet."
    if not judged.empty:
        compute = (f"{int(judged['epochs_done'].max())} epoch(s) each, {int(images.min())} to {int(images.max())} "
                   f"train images seen per run, {hours:.2f} h of training on {', '.join(devices)}.")
    splits = {by_name[name]["info"]["data"]["split_sha256"] for name in judged["run"]}
    same_split = ("every judged run uses the same split.csv" if len(splits) <= 1 else
                  f"**the judged runs use {len(splits)} different split.csv files**, so their numbers are not comparable")
    return [
        "## Claims: does SGD fail where AdamW works?",
        "",
        f"Trained by `facedeit claims` from `{plan.path}` at profile `{plan.profile}`; {same_split}. "
        "Criteria, from the criteria file:",
        "",
        *[f"- {line}" for line in criteria.describe()],
        "",
        "From the plan, not the criteria file: a claim made of two others holds when both hold, and does not hold "
        "when either does not.",
        "",
        _criteria_status(criteria_file, results_dir / "claims" / "criteria.lock.json", runs, set(outcomes["run"])),
        "",
        "A model that learns only how often each person occurs lowers the loss from ln(people) to the entropy of "
        "the label distribution" + _prior_drop_text(runs, judged) + ". The balanced accuracy (mean of per-person recall, "
        "100/people when a run always predicts one person) shows whether a run did more than that. Train losses "
        "are not comparable across recipes with mixup, cutmix or label smoothing, which change the targets.",
        "",
        f"**Compute behind the verdicts**: {len(judged)} distinct run(s) judged out of "
        f"{outcomes['run'].nunique()} planned, {compute}",
        "",
    ]


def _summary_lines(plan: Plan, summary: pd.DataFrame, epochs: int) -> list[str]:
    lines = []
    table = summary[summary["expect"] != "both"].copy()
    if not table.empty:
        table["val top-1 mean ± sd [min, max]"] = [_spread_text(r) for _, r in table.iterrows()]
        table["loss drop mean (%)"] = 100 * table["loss_drop_mean"]
        table["balanced acc mean (%)"] = table["val_balanced_acc_mean"]
        table["images/run"] = table["images_seen_per_run"]
        table["top-1 runs"] = table["top1_runs"]
        for column in ("runs", "planned", "seeds", "images/run", "top-1 runs"):
            table[column] = table[column].round().astype("Int64")
        lines += [_markdown(table[["claim", "expect", "runs", "planned", "seeds", "epochs", "images/run", "outcomes",
                                   "top-1 runs", "val top-1 mean ± sd [min, max]", "balanced acc mean (%)",
                                   "loss drop mean (%)", "verdict"]], ".1f"),
                  "The val top-1 columns cover the `top-1 runs`: a diverged run counts as failed but has no val "
                  "top-1. For the lr sweep they spread over its points (one seed each), not over seeds.", ""]
    for row in summary.itertuples():
        lines.append(f"- **{row.text}: {row.verdict}** at profile `{plan.profile}` ({epochs} epochs)."
                     + (f" ({row.outcomes}; the sweep and the ResNet18 control have their own verdicts.)"
                        if row.expect == "both" else ""))
    lines.append("")
    return lines


def _sweep_lines(sweep: pd.DataFrame, verdict: str, plots: list[str]) -> list[str]:
    lines = ["### A fair chance for SGD: lr sweep", "",
             "The team's SGD recipe with the AdamW recipe's cosine schedule, so that the optimizer is the only "
             "difference from `seed_adamw`; one seed per point.", ""]
    if "claims_sweep.png" in plots:
        lines += ["![SGD lr sweep](plots/claims_sweep.png)", ""]
    lines += [_markdown(sweep.fillna({"outcome": ""}) if not sweep.empty else sweep, ".4g")]
    judged = sweep[sweep["val_top1"].notna()] if not sweep.empty else sweep
    best = judged.sort_values(["val_top1", "loss_drop"], ascending=False).head(1)
    if not best.empty:
        b = best.iloc[0]
        text = (f"Best SGD point: lr {b['lr']:g}, warmup {b['warmup_epochs']:g} epoch(s) (of the recipe's 25, "
                f"scaled with the profile): val top-1 {b['val_top1']:.2f}% ({b['top1_margin']:+.2f} points "
                f"over the majority class), outcome **{b['outcome']}**. "
                f"Points judged: {int(sweep['outcome'].notna().sum())} of {len(sweep)}.")
        lrs = pd.to_numeric(sweep["lr"])
        if b["lr"] in (lrs.min(), lrs.max()):
            text += (f" It is at the {'top' if b['lr'] == lrs.max() else 'bottom'} of the lr grid, so an lr "
                     f"{'above' if b['lr'] == lrs.max() else 'below'} it could do better.")
        drop_uniform = b.get("loss_drop_uniform")
        if drop_uniform is not None and not pd.isna(drop_uniform) and b["loss_drop"] - drop_uniform > 0.05:
            text += (f" Its start loss ({b['start_loss']:.2f}) includes an early loss spike, so its loss drop "
                     f"({b['loss_drop']:.0%}) is larger than the drop from ln(people) ({drop_uniform:.0%}).")
        lines += [text, ""]
    lines += [SWEEP_READING.get(verdict, ""), ""]
    return lines


def _ablation_lines(ablation: pd.DataFrame, plots: list[str]) -> list[str]:
    lines = ["### Ablation in the style of Table 8", "",
             "The DeiT-B column on DeiT-Ti-LS with one ingredient removed at a time. `vs_full` is the mean "
             "difference from the full recipe at the same seed, over `paired_seeds` seeds, in points; compare it "
             "with the spread over seeds before reading anything into it.", ""]
    full = ablation[ablation["removed"] == "none (full recipe)"] if not ablation.empty else ablation
    if len(full) and full["runs"].iloc[0] > 0 and "works" not in str(full["outcomes"].iloc[0]):
        lines += ["The full recipe does not learn at this budget (outcomes: " + str(full["outcomes"].iloc[0]) + "), so removing an "
                  "ingredient cannot show what that ingredient adds. The rows can only show whether a recipe without it "
                  "starts to learn sooner.", ""]
    if "claims_ablation.png" in plots:
        lines += ["![ablation](plots/claims_ablation.png)", ""]
    lines += [_markdown(ablation, ".2f")]
    return lines


def _paper_lines(plan: Plan, outcomes: pd.DataFrame, summary: pd.DataFrame, ablation: pd.DataFrame,
                 sweep: pd.DataFrame, epochs: int) -> list[str]:
    paper = plan.paper
    gap = paper["sgd_top1"] - paper["adamw_top1"]
    lines = ["### The paper's context", "",
             f"{paper['source']} gives DeiT-B on ImageNet-1k (300 epochs) {paper['adamw_top1']:g}% top-1 with AdamW "
             f"and {paper['sgd_top1']:g}% with SGD: SGD is {abs(gap):.1f} points lower but trains. The paper does "
             "not say that SGD fails.", ""]
    rows = ablation.set_index("removed") if not ablation.empty else pd.DataFrame()
    if {"none (full recipe)", "adamw"} <= set(rows.index) and rows.loc[["none (full recipe)", "adamw"], "val_top1_mean"].notna().all():
        full, sgd = rows.loc["none (full recipe)"], rows.loc["adamw"]
        setting = (f"On the faces (DeiT-Ti-LS, {epochs} epochs at profile `{plan.profile}`), the same recipe gives "
                   f"{full['val_top1_mean']:.2f}% with AdamW ({int(full['runs'])} run(s)) and {sgd['val_top1_mean']:.2f}% "
                   f"with SGD ({int(sgd['runs'])} run(s))")
        if set(str(full["outcomes"]).split(", ")) == {FAILS} and set(str(sgd["outcomes"]).split(", ")) == {FAILS}:
            lines.append(setting + ". Every one of these runs fails by the criteria, so there is no gap to set "
                         "beside the paper's.")
        elif sgd["paired_seeds"] == 0:
            lines.append(setting + ", but the two rows share no seed, so they are not compared.")
        else:
            lines.append(setting + f": SGD minus AdamW at the same seed is {sgd['vs_full']:+.2f} points over "
                         f"{int(sgd['paired_seeds'])} seed(s) (paper {gap:+.1f}).")
    adamw = _claim_mean(summary, "team_adamw_works")
    sgd_team = _claim_mean(summary, "team_sgd_fails")
    if adamw is not None and sgd_team is not None:
        lines.append(f"The team's recipes give {adamw:.2f}% (AdamW) and {sgd_team:.2f}% (SGD), means over seeds.")
    best = pd.to_numeric(sweep["val_top1"]).max() if not sweep.empty else None
    if best is not None and not pd.isna(best):
        lines.append(f"The best point of the SGD sweep (one seed) reaches {best:.2f}%.")
    if _adamw_never_works(outcomes, summary):
        lines.append("No DeiT-Ti-LS AdamW run works at this budget while the team's SGD runs fail, so where the team's claim "
                     "does not hold here it is because AdamW does not learn either, not because SGD does. Whether "
                     "SGD falls behind AdamW on faces at the team's 25 epochs, or the paper's 300, this budget "
                     "cannot tell.")
    lines.append("")
    return lines


def _adamw_never_works(outcomes: pd.DataFrame, summary: pd.DataFrame) -> bool:
    """Return True when every planned DeiT-Ti-LS AdamW claim run is judged and none works, and "team SGD fails" holds."""
    verdicts = summary.set_index("claim")["verdict"] if not summary.empty else pd.Series(dtype=object)
    if verdicts.get("team_sgd_fails") != HOLDS:
        return False
    adamw = outcomes[(outcomes["group"] == "claims") & outcomes["label"].isin(["team_adamw_works", "deit_b_works"])]
    return bool(not adamw.empty and adamw["outcome"].notna().all() and not (adamw["outcome"] == WORKS).any())


def _markdown(frame: pd.DataFrame, floatfmt: str) -> str:
    if frame.empty:
        return "_no runs_\n"
    return frame.to_markdown(index=False, floatfmt=floatfmt) + "\n"
