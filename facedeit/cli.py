"""The `facedeit` command: argument parsing only; each subcommand calls one stage."""

import argparse
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("facedeit")

DEFAULT_CROPS = Path("cache/faces")
DEFAULT_RESULTS = Path("results")
DEFAULT_PLAN = Path("claims/plan.yaml")
DEFAULT_CRITERIA = Path("claims/criteria.yaml")


def _folder(text: str) -> Path:
    # Path("") would silently mean the current folder.
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path; give a folder")
    return Path(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facedeit", description="Crop faces with MTCNN, train recipes on the crops, and report the runs."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    crop = sub.add_parser("crop", help="detect faces with MTCNN, write 160x160 crops, manifest.csv and split.csv")
    crop.add_argument("--data", type=_folder, help="folder of <person>/<photo> files (default: the shared LFW subset)")
    crop.add_argument("--out", type=Path, default=DEFAULT_CROPS, help="crop cache and CSV folder (default: %(default)s)")
    crop.add_argument("--margin", type=int, default=20, help="pixels added around the face box, in crop pixels (default: %(default)s)")
    crop.add_argument("--min-face-size", type=int, default=20, help="smallest face MTCNN looks for, in photo pixels (default: %(default)s)")
    crop.add_argument("--thresholds", type=float, nargs=3, default=(0.6, 0.7, 0.7), metavar=("P", "R", "O"),
                      help="MTCNN P-Net, R-Net and O-Net score thresholds (default: 0.6 0.7 0.7)")
    crop.add_argument("--min-images", type=int, default=2, help="leave out people with fewer face crops (default: %(default)s)")
    crop.add_argument("--val-fraction", type=float, default=0.2, help="share of each person's crops kept for val (default: %(default)s)")
    crop.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default: %(default)s)")
    crop.add_argument("--device", help="torch device for MTCNN (default: cuda when present, else cpu)")

    recipe = sub.add_parser("recipe", help="inspect recipes")
    recipe_sub = recipe.add_subparsers(dest="recipe_command", required=True)
    show = recipe_sub.add_parser("show", help="print a recipe's resolved values under a profile")
    show.add_argument("file", type=Path)
    show.add_argument("--profile", default="quick", help="smoke, quick or full, as for train (default: %(default)s)")
    check = recipe_sub.add_parser("check", help="check recipes under a profile without training (exit 2 on the first error)")
    check.add_argument("files", type=Path, nargs="+")
    check.add_argument("--profile", default="quick", help="smoke, quick or full, as for train (default: %(default)s)")
    check.add_argument("--world-size", type=int, default=1, help="processes the batch is split over (default: %(default)s)")
    check.add_argument("--accum-steps", type=int, default=1, help="micro-batches per process, as for train (default: %(default)s)")

    for name, help_text in (("train", "train one recipe"), ("run", "train several recipes in turn")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("recipes", type=Path, nargs=1 if name == "train" else "+", help="recipe YAML file(s)")
        p.add_argument("--crops", type=Path, default=DEFAULT_CROPS, help="folder written by `facedeit crop` (default: %(default)s)")
        p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="results folder (default: %(default)s)")
        p.add_argument("--profile", default="quick", help="smoke, quick or full (default: %(default)s)")
        p.add_argument("--seed", type=int, default=0, help="training seed (default: %(default)s)")
        p.add_argument("--resume", action="store_true", help="continue an unfinished run from its last checkpoint")
        p.add_argument("--device", help="torch device (default: cuda when present, else cpu)")
        p.add_argument("--keep-checkpoints", type=int, default=3, help="newest epoch checkpoints kept per run (default: %(default)s)")
        p.add_argument("--accum-steps", type=int, default=1,
                       help="split each process's share of the batch into this many micro-batches (default: %(default)s)")
        p.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    claims = sub.add_parser("claims", help="train the runs of claims/plan.yaml that are missing, then write the report")
    claims.add_argument("--plan", type=Path, default=DEFAULT_PLAN, help="claims plan (default: %(default)s)")
    claims.add_argument("--criteria", type=Path, default=DEFAULT_CRITERIA, help="criteria file (default: %(default)s)")
    claims.add_argument("--crops", type=Path, default=DEFAULT_CROPS, help="folder written by `facedeit crop` (default: %(default)s)")
    claims.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="results folder (default: %(default)s)")
    claims.add_argument("--only", choices=("claims", "sweep", "ablation"), help="train only this part of the plan")
    claims.add_argument("--max-runs", type=int, help="train at most this many missing runs, then report")
    claims.add_argument("--dry-run", action="store_true", help="list the planned runs and which are done; train nothing")
    claims.add_argument("--device", help="torch device (default: cuda when present, else cpu)")
    claims.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    report = sub.add_parser("report", help="write results/REPORT.md, tables and plots from the run folders")
    report.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="results folder (default: %(default)s)")
    report.add_argument("--recipes", type=Path, default=Path("recipes"), help="recipe folder for the paper table (default: %(default)s)")
    report.add_argument("--plan", type=Path,
                        help=f"claims plan (default: {DEFAULT_PLAN}; without it the claims section is left out)")
    report.add_argument("--criteria", type=Path, default=DEFAULT_CRITERIA, help="criteria file (default: %(default)s)")
    return parser


def cmd_crop(args) -> int:
    from facedeit.faces import (CropError, DetectorSettings, check_detector_settings, check_split_options,
                                crop_folder, person_folders, split_people, write_manifest, write_split)
    from facedeit.sources import default_data_dir

    settings = DetectorSettings(margin=args.margin, min_face_size=args.min_face_size, thresholds=tuple(args.thresholds))
    check_detector_settings(settings)
    check_split_options(args.min_images, args.val_fraction)
    if args.out.exists() and not args.out.is_dir():
        raise CropError(f"--out {args.out}: exists and is not a folder")
    data_dir = args.data if args.data is not None else default_data_dir()
    log.info("cropping faces in %s into %s", data_dir, args.out)
    # Crops are cached as they are made. manifest.csv is written only after the split succeeds.
    manifest = crop_folder(data_dir, args.out, settings, args.device, write=False)
    counts = manifest["status"].value_counts()
    cached = int(manifest["cached"].sum())
    print(f"{len(manifest)} files: " + ", ".join(f"{s} {int(counts.get(s, 0))}" for s in ("cropped", "no_face", "unreadable"))
          + f" ({cached} from the cache)")
    for row in manifest[manifest["status"] == "unreadable"].itertuples():
        print(f"  unreadable: {row.path}: {row.error}")
    people = [folder.name for folder in person_folders(data_dir)]
    try:
        split, excluded = split_people(manifest, args.min_images, args.val_fraction, args.seed, people)
    except CropError as err:
        raise CropError(f"{data_dir}: {err}") from None
    write_manifest(data_dir, args.out, settings, manifest)
    write_split(args.out, split, excluded, args.seed, args.val_fraction, args.min_images)
    if excluded:
        print(f"left out {len(excluded)} people with fewer than {args.min_images} crops: "
              + ", ".join(f"{p} ({n})" for p, n in excluded.items()))
    sizes = split["split"].value_counts()
    print(f"split: {split['person'].nunique()} people, {int(sizes.get('train', 0))} train, "
          f"{int(sizes.get('val', 0))} val -> {args.out / 'split.csv'}")
    return 0


def cmd_recipe_show(args) -> int:
    from facedeit.recipes import load_recipe, resolve

    run = resolve(load_recipe(args.file), args.profile)
    print(json.dumps(run.to_dict(), indent=2, default=str))
    return 0


def check_recipes(paths: list[Path], profile: str, world_size: int, accum_steps: int) -> list:
    """Load and resolve every recipe before anything runs; raise RecipeError naming the first bad file and key."""
    from facedeit.data import device_batch_size
    from facedeit.recipes import RecipeError, load_recipe, resolve

    checked = []
    for path in paths:
        recipe = load_recipe(path)
        run = resolve(recipe, profile)
        try:
            device_batch_size(run.batch_size, world_size, accum_steps)
        except ValueError as err:
            raise RecipeError(f"{path}: batch_size {run.batch_size} under profile {profile}: {err}") from None
        checkpoint = recipe.model.checkpoint
        if checkpoint and not Path(checkpoint).is_file():
            raise RecipeError(f"{path}: model.checkpoint: file not found: {checkpoint}")
        checked.append((path, recipe, run))
    return checked


def cmd_recipe_check(args) -> int:
    for path, _, run in check_recipes(args.files, args.profile, args.world_size, args.accum_steps):
        print(f"ok: {path} ({run.recipe.model.name}, profile {args.profile}: {run.epochs} epochs, batch {run.batch_size}, lr {run.lr:.3g})")
    return 0


def cmd_train(args) -> int:
    from facedeit.distributed import init_world, shutdown
    from facedeit.train import train_recipe

    # Check every recipe first, so a typo in the last file stops the command before any training.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    recipes = [(path, recipe) for path, recipe, _ in check_recipes(args.recipes, args.profile, world_size, args.accum_steps)]
    world, device = init_world(args.device)
    if not world.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    statuses = {}
    try:
        for path, recipe in recipes:
            info = train_recipe(recipe, args.crops, args.results, args.profile, args.seed, args.resume, device,
                                progress=not args.no_progress, keep_checkpoints=args.keep_checkpoints,
                                recipe_file=str(path), world=world, accum_steps=args.accum_steps)
            statuses[info["run"]] = info["status"]
    finally:
        shutdown(world)
    if world.is_main:
        for run, status in statuses.items():
            print(f"{run}: {status}")
    # A diverged run is a result, not an error, for `run`; `train` reports it in its exit code.
    if args.command == "train" and "diverged" in statuses.values():
        return 3
    return 0


def cmd_claims(args) -> int:
    from facedeit.claim_plan import load_plan, training_order
    from facedeit.claims import check_plan_criteria, load_criteria, planned_status, record_criteria
    from facedeit.distributed import pick_device
    from facedeit.report import write_report
    from facedeit.train import RunExistsError, train_recipe

    if args.max_runs is not None and args.max_runs < 0:
        raise ValueError(f"--max-runs: {args.max_runs} must not be negative")
    plan = load_plan(args.plan)
    check_plan_criteria(plan, load_criteria(args.criteria))
    todo = training_order(plan, args.only)
    status = planned_status(plan, args.results)
    if args.dry_run:
        for run in todo:
            name = run.run_name(plan.profile)
            print(f"{run.group:9} {run.label:24} {name}: {status[name]}")
        return 0
    changed = [r.run_name(plan.profile) for r in todo if status[r.run_name(plan.profile)] == "changed"]
    if changed:
        raise RunExistsError(f"{args.results / 'runs' / changed[0]}: was trained with other recipe values than "
                             f"{args.plan} gives ({len(changed)} such run folder(s)); remove them to train them again")
    damaged = [r.run_name(plan.profile) for r in todo if status[r.run_name(plan.profile)].startswith("damaged")]
    if damaged:
        raise RunExistsError(f"{args.results / 'runs' / damaged[0]}: {status[damaged[0]]}; {len(damaged)} finished run "
                             "folder(s) lack rows of their CSV files: restore the files, or remove the folders to train "
                             "them again")
    if not (args.crops / "split.csv").is_file():
        raise FileNotFoundError(f"{args.crops / 'split.csv'}: not found; run `facedeit crop` first")
    device = pick_device(args.device)
    trained = 0
    for run in todo:
        name = run.run_name(plan.profile)
        if status[name] in ("finished", "diverged"):
            continue
        if args.max_runs is not None and trained >= args.max_runs:
            log.info("stopping after %d run(s) (--max-runs); run `facedeit claims` again to continue", trained)
            break
        # Recorded before the first claims run trains, so that the report can tell whether the criteria changed later.
        record_criteria(args.criteria, args.results)
        log.info("claims: %s (%s, %s)", name, run.group, run.label)
        train_recipe(run.recipe, args.crops, args.results, plan.profile, run.seed, resume=True, device=device,
                     progress=not args.no_progress, keep_checkpoints=1, recipe_file=run.recipe_file)
        trained += 1
    path = write_report(args.results, criteria_file=args.criteria, plan_file=args.plan)
    print(f"report: {path}")
    return 0


def cmd_report(args) -> int:
    from facedeit.report import write_report

    plan = args.plan if args.plan is not None else DEFAULT_PLAN
    if args.plan is not None and not args.plan.is_file():
        raise FileNotFoundError(f"{args.plan}: plan file not found")
    path = write_report(args.results, args.recipes, args.criteria, plan)
    print(f"report: {path}")
    return 0


def main(argv=None) -> int:
    from facedeit.faces import CropError
    from facedeit.recipes import RecipeError
    from facedeit.sources import NoDataError
    from facedeit.train import RunExistsError
    import torch

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.command == "crop":
        handler = cmd_crop
    elif args.command == "recipe":
        handler = cmd_recipe_show if args.recipe_command == "show" else cmd_recipe_check
    elif args.command in ("train", "run"):
        if args.keep_checkpoints < 1:
            print("facedeit: error: --keep-checkpoints must be at least 1", file=sys.stderr)
            return 2
        handler = cmd_train
    elif args.command == "claims":
        handler = cmd_claims
    else:
        handler = cmd_report
    if getattr(args, "device", None):
        try:
            device = torch.device(args.device)
        except RuntimeError:
            print(f"facedeit: error: --device {args.device}: not a torch device (use cpu, cuda or cuda:N)", file=sys.stderr)
            return 2
        if device.type == "cuda" and not torch.cuda.is_available():
            print(f"facedeit: error: --device {args.device}: CUDA is not available on this machine", file=sys.stderr)
            return 2
    try:
        return handler(args)
    except (CropError, RecipeError, NoDataError, RunExistsError, FileNotFoundError, ValueError) as err:
        print(f"facedeit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Crops, checkpoints and CSVs written so far are kept; `--resume` continues a stopped run.
        print("facedeit: interrupted; what was written so far is kept", file=sys.stderr)
        return 130
