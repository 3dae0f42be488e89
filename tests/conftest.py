import os

# Verify graph invariants after every pass in tests; set before edgetune is imported.
os.environ.setdefault("EDGETUNE_CHECK", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_torch():
    # Each test starts from the same RNG state, so results do not depend on test order
    # or on which xdist worker runs it.
    torch.manual_seed(0)
    yield
