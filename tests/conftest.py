import os

# Verify graph invariants after every pass in tests; set before edgetune is imported.
os.environ.setdefault("EDGETUNE_CHECK", "1")
# Ray runs the Simulation Engine's virtual clients at niceness 15 by default; beside the other
# xdist worker's test they then wait for a core for minutes. They are the test's work here.
os.environ.setdefault("RAY_worker_niceness", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist every worker would otherwise spin one thread per core, and the
# oversubscribed OpenMP pools make small kernels tens of times slower.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))


@pytest.fixture(autouse=True)
def _seed_torch():
    # Each test starts from the same RNG state, so results do not depend on test order
    # or on which xdist worker runs it.
    torch.manual_seed(0)
    yield


def pytest_addoption(parser):
    parser.addoption("--zoo-full", action="store_true", default=False,
                     help="tests/e2e/test_zoo.py: every Hugging Face family under every scheme "
                          "(by default, the families of zoo.DEFAULT under the combined scheme)")


def pytest_configure(config):
    config.addinivalue_line("markers", "zoo_full: a zoo case that runs only with --zoo-full")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--zoo-full"):
        return
    skip = pytest.mark.skip(reason="a --zoo-full case (tests/e2e/test_zoo.py)")
    for item in items:
        if "zoo_full" in item.keywords:
            item.add_marker(skip)
