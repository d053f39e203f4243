"""pytest plugin of the benchmark suite: collects ``bench_*.py``, gives the fixtures of README.md,
shows a progress bar, and writes the report at the end of the session.

Triton runs in its CPU interpreter when there is no GPU (set here, before peftkern is imported).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from benchmarks import harness  # noqa: E402

_ROWS = pytest.StashKey[list]()
_OPS = pytest.StashKey[set]()


def pytest_addoption(parser):
    group = parser.getgroup("peftkern bench")
    group.addoption("--bench-quick", action="store_true", help="tiny shapes, few rounds (checks the harness)")
    group.addoption("--bench-out", default=None, help="folder for the report (default: benchmarks/results)")
    group.addoption("--bench-no-report", action="store_true", help="do not write the report files")
    group.addoption("--bench-progress", action="store_true", help="show a tqdm progress bar on stderr")
    group.addoption("--bench-threads", type=int, default=1,
                    help="torch CPU threads for measured cases (default 1: on a shared machine more threads "
                         "turn small ops into OpenMP spin-waits); 0 keeps torch's default")


def pytest_configure(config):
    if config.getoption("--bench-quick"):
        os.environ[harness.QUICK_ENV] = "1"
    threads = config.getoption("--bench-threads")
    if threads:
        torch.set_num_threads(threads)
        os.environ[harness.THREADS_ENV] = str(threads)  # the fresh memory subprocesses follow
    config.stash[_ROWS] = []
    config.stash[_OPS] = set()
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collect_file(file_path, parent):
    # Files named on the command line are collected by pytest itself; the rest (a folder given) here.
    if file_path.name.startswith("bench_") and file_path.suffix == ".py" and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _op_of(item) -> str:
    return item.path.stem.removeprefix("bench_")


def pytest_collection_modifyitems(config, items):
    config.stash[_OPS] = {_op_of(item) for item in items}
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


class _Progress:
    def __init__(self, total):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="case", desc="peftkern bench", dynamic_ncols=True)

    def pytest_runtest_logstart(self, nodeid, location):
        self.bar.set_postfix_str(nodeid.split("::")[-1][:60])

    def pytest_runtest_logfinish(self, nodeid, location):
        self.bar.update(1)


def pytest_collection_finish(session):
    if session.config.getoption("--bench-progress") and session.items:
        session.config.pluginmanager.register(_Progress(len(session.items)), "peftkern-bench-progress")


@pytest.fixture
def quick() -> bool:
    return harness.is_quick()


@pytest.fixture
def record(request):
    """``record(kind=..., case=..., ...)``: adds one row (see harness.make_row); returns it."""
    rows = request.config.stash[_ROWS]
    op = _op_of(request.node)

    def add(**fields):
        row = harness.make_row(op, **fields)
        rows.append(row)
        return row

    return add


@pytest.fixture
def timer(request):
    """``timer({"ours": fn, "peft": fn, ...}, rounds=N)`` -> {name: median seconds}, interleaved;
    the samples are kept on ``timer.samples`` for the noise figure."""
    try:
        benchmark = request.getfixturevalue("benchmark")
    except pytest.FixtureLookupError:
        benchmark = None

    class Timer:
        samples: dict = {}

        def __call__(self, contenders, rounds, warmup=1):
            self.samples = harness.interleaved(contenders, rounds, warmup, benchmark)
            medians = {name: harness.median(s) for name, s in self.samples.items()}
            if benchmark is not None:
                benchmark.extra_info.update({f"median_s_{k}": v for k, v in medians.items()})
            return medians

    return Timer()


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    rows = config.stash.get(_ROWS, [])
    if not rows or config.getoption("--bench-no-report"):
        return
    from benchmarks import report

    out = config.getoption("--bench-out")
    paths = report.write(rows, out_dir=out, quick=harness.is_quick(), ops=sorted(config.stash[_OPS]))
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("peftkern bench wrote: " + ", ".join(str(p) for p in paths))
