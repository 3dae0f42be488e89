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
    files.py   files written whole or not at all (used by every layer)
"""
from edgetune.compiler import scheme as schemes
from edgetune.compiler.optim import SGD, AdamW
from edgetune.compiler.scheme import Scheme
from edgetune.compiler.backends.torch import NonFiniteError
from edgetune.compiler.inputs import BatchError
from edgetune.compiler.trainer import Trainer, compile

__all__ = ["compile", "Scheme", "schemes", "SGD", "AdamW", "Trainer", "NonFiniteError", "BatchError"]
from edgetune.version import __version__  # noqa: E402
