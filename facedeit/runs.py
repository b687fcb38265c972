"""Run folders: `results/runs/<recipe>-<profile>-seed<N>/` with run.json, CSVs and checkpoints."""

import datetime as dt
import hashlib
import json
import platform
import subprocess
from pathlib import Path

import torch

RUN_STATUSES = ("running", "finished", "diverged", "stopped", "failed")


def run_name(recipe: str, profile: str, seed: int) -> str:
    return f"{recipe}-{profile}-seed{seed}"


def now_utc() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {cpu}, {torch.get_num_threads()} threads"


def environment(device: torch.device) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("torch", "torchvision", "timm", "facenet-pytorch", "numpy", "pandas"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "device": str(device),
        "device_name": device_name(device),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "git_commit": git_commit(),
    }


def git_commit() -> str | None:
    """Return the source tree's commit, with `+dirty` for uncommitted changes, or None outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        # results/ is tracked but written by the runs themselves, so it does not count as a source change.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# Keys every run.json written by training has, and that the report reads.
RUN_INFO_KEYS = ("run", "status", "profile", "resolved", "data", "env")


def read_run_info(info_file: Path) -> dict:
    """Read a run.json; raise ValueError naming the file when it is not JSON or lacks a key the report reads."""
    try:
        info = json.loads(Path(info_file).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{info_file}: invalid JSON ({err}); remove the run folder or train it again") from None
    if not isinstance(info, dict):
        raise ValueError(f"{info_file}: expected a JSON object, got {type(info).__name__}; "
                         "remove the run folder or train it again")
    missing = [key for key in RUN_INFO_KEYS if key not in info]
    if missing:
        raise ValueError(f"{info_file}: {missing[0]}: missing key; remove the run folder or train it again")
    return info


def damaged_files(info: dict, steps_rows: int, epochs_rows: int) -> str | None:
    """Return what a finished run's steps.csv or epochs.csv lacks, or None when both are whole."""
    if info.get("status") != "finished":
        return None
    done = info.get("epochs_done", 0)
    if epochs_rows != done:
        return f"epochs.csv has {epochs_rows} of {done} epochs"
    total = info.get("schedule_updates", {}).get("total_updates")
    if total is not None and steps_rows != total:
        return f"steps.csv has {steps_rows} of {total} updates"
    return None


def csv_rows(path: Path) -> int:
    """Count the data rows of a CSV file; 0 when it is missing or empty."""
    path = Path(path)
    if not path.is_file():
        return 0
    with path.open() as handle:
        return max(sum(1 for _ in handle) - 1, 0)


# Recipe fields that document a run but do not change what it trains.
DESCRIPTIVE_FIELDS = ("description", "source")


def same_recipe_values(trained: dict, planned: dict) -> bool:
    """Compare two resolved recipe dicts, leaving out description and source."""
    def values(recipe: dict) -> dict:
        plain = json.loads(json.dumps(recipe, default=str))
        return {k: v for k, v in plain.items() if k not in DESCRIPTIVE_FIELDS}
    return values(trained) == values(planned)
