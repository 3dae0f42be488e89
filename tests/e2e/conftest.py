import os

import torch

# Under pytest-xdist every worker would otherwise spin one thread per core, and the
# oversubscribed OpenMP pools make the small kernels here tens of times slower.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))
