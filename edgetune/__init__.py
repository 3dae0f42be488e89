"""edgetune: compiled, sparse fine-tuning for devices where memory and compute are scarce."""
from edgetune import scheme as schemes
from edgetune.optim import SGD, AdamW
from edgetune.scheme import Scheme
from edgetune.trainer import Trainer, compile

__all__ = ["compile", "Scheme", "schemes", "SGD", "AdamW", "Trainer"]
__version__ = "0.1.0"
