"""edgetune: compiled, sparse fine-tuning for devices where memory and compute are scarce.

    trainer = edgetune.compile(model, loss_fn, (x,), (y,), scheme=edgetune.schemes.bias_only(),
                               optimizer=edgetune.SGD(lr=0.01, momentum=0.9))
    loss = trainer.step((x,), (y,))

The package, from the bottom up:
    compiler/  model + scheme -> one compiled training step (IR, frontend, autodiff, passes,
               memory plan, optimizers, backends) and the Trainer that runs it
    models/    built-in and pretrained models;  data/  datasets and preprocessing
    apps/      what is built on the compiler: fine-tuning loops, LM tools, scheme search,
               memory measurement, the demo
    cli.py     the `edgetune` command
    runtime/   an exported step run by onnxruntime alone, without PyTorch
    files.py   files written whole or not at all (used by every layer)
"""
import importlib

from edgetune.version import __version__

# The API, imported on first use (PEP 562): `import edgetune.runtime` on a device that has
# onnxruntime but no PyTorch must not import the compiler, which needs torch.
_API = {"compile": "edgetune.compiler.trainer", "Trainer": "edgetune.compiler.trainer",
        "SGD": "edgetune.compiler.optim", "AdamW": "edgetune.compiler.optim", "MeZO": "edgetune.compiler.optim",
        "GaLore": "edgetune.compiler.optim", "Adafactor": "edgetune.compiler.optim",
        "Scheme": "edgetune.compiler.scheme",
        "NonFiniteError": "edgetune.compiler.backends.torch", "BatchError": "edgetune.compiler.inputs"}
__all__ = [*_API, "schemes", "__version__"]


def __getattr__(name: str):
    if name == "schemes":
        require_torch("edgetune.schemes")
        return importlib.import_module("edgetune.compiler.scheme")
    if name in _API:
        require_torch(f"edgetune.{name}")
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'edgetune' has no attribute {name!r}")


def require_torch(what: str) -> None:
    """Raise, saying what to install, where PyTorch is missing (an `edgetune[runtime]` install)."""
    try:
        importlib.import_module("torch")
    except ImportError as err:
        raise ModuleNotFoundError(
            f"{what} needs PyTorch, which this install lacks ({err}): pip install 'edgetune[train]'. "
            "An edgetune[runtime] install runs exported steps only: edgetune.runtime.StepRunner", name="torch") from None
