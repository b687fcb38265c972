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


def read_run(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "run.json").read_text())


# Recipe fields that document a run but do not change what it trains.
DESCRIPTIVE_FIELDS = ("description", "source")


def same_recipe_values(trained: dict, planned: dict) -> bool:
    """Compare two resolved recipe dicts, leaving out description and source."""
    def values(recipe: dict) -> dict:
        plain = json.loads(json.dumps(recipe, default=str))
        return {k: v for k, v in plain.items() if k not in DESCRIPTIVE_FIELDS}
    return values(trained) == values(planned)
