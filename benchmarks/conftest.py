"""Fixtures of the throughput benchmarks, and the CSV written when the session ends.

Settings come from the FACEDEIT_BENCH_* variables that facedeit.bench lists.
Each benchmark stores its row in pytest-benchmark's extra_info (so it lands in
the --benchmark-json file) and in this session's row list, which becomes
`<FACEDEIT_BENCH_OUT>/benchmarks-<cpu|cuda>.csv`.
"""

import gc

import pytest
import torch

from facedeit import bench

ROWS = pytest.StashKey[list]()
CSV_PATH = pytest.StashKey[str]()


def pytest_configure(config):
    config.stash[ROWS] = []


def pytest_report_header(config):
    settings = bench.load_config()
    return [
        f"facedeit benchmarks: device {settings.device}, models {','.join(settings.models)}, "
        f"batches {','.join(map(str, settings.batches))}, {settings.rounds} rounds after {settings.warmup} warm-up, "
        f"compile {settings.compile}, CSV to {settings.out_dir}"
    ]


@pytest.fixture(scope="session")
def bench_config() -> bench.BenchConfig:
    return bench.load_config()


@pytest.fixture(scope="session")
def peak(bench_config) -> tuple[float, str]:
    """The device's peak FLOP/s and its source, measured before the first model benchmark on the CPU."""
    return bench.device_peak(bench_config)


@pytest.fixture(scope="session")
def flops_cache() -> dict:
    """FLOPs per image by (model, train), counted once per session."""
    return {}


@pytest.fixture(autouse=True)
def release_memory():
    """Free the previous benchmark's models and batches before the next one allocates its own."""
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@pytest.fixture
def record(request, benchmark):
    """Return a function that stores a finished benchmark's row in the session's CSV rows and in extra_info.

    The row's columns go to the top level of extra_info, or under `extra_info_key` when one is given.
    """

    def store(row: dict, extra_info_key: str | None = None) -> dict:
        if extra_info_key is None:
            benchmark.extra_info.update(bench.json_safe(row))
        else:
            benchmark.extra_info[extra_info_key] = bench.json_safe(row)
        request.config.stash[ROWS].append(row)
        return row

    return store


def pytest_sessionfinish(session, exitstatus):
    rows = session.config.stash.get(ROWS, [])
    if rows:
        settings = bench.load_config()
        session.config.stash[CSV_PATH] = str(bench.write_csv(rows, settings.out_dir, settings.kind))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    path = config.stash.get(CSV_PATH, None)
    if path:
        terminalreporter.write_line(f"facedeit benchmark CSV: {path}")
