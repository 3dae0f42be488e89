"""Federated sparse fine-tuning with Flower: edgetune as the client trainer (the `federated` extra).

Only the trained slices travel: biases, a partially trained weight's chosen channels, LoRA
adapters. The frozen rest stays where the model was built, on every node and on the server.

    records  a Trainer's trained tensors <-> a Flower ArrayRecord, strictly checked on load
    client   Task (what every node builds) and client_app(task): a flwr ClientApp
    server   server_app(task, num_rounds): a flwr ServerApp with FedAvg over the slices and a
             History; run_simulation(task, num_clients, num_rounds) on Flower's Simulation Engine
    fedkseed FedKSeed: MeZO nodes send (seed index, gradient) pairs, the server K per-seed
             sums; fedkseed.run_simulation(task, num_clients, num_rounds, k=1024)
    job      `edgetune federate`'s parts: a Task from an edgetune job, iid/Dirichlet partitions, the plot
    slices   which entries train (no Flower)

Flower is imported here and nowhere else in edgetune; `import edgetune` never imports it.
"""
import importlib
import os

# Nothing here reaches the internet unless asked: Flower reports usage events (read when flwr is
# first imported) and Ray, which runs Flower's Simulation Engine, its usage statistics with a
# cloud-provider probe (169.254.169.254), each unless told not to. A user who sets either
# variable keeps their choice.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

_API = {"Task": "client", "client_app": "client", "evaluate": "client",
        "server_app": "server", "run_simulation": "server", "History": "server", "SparseFedAvg": "server",
        "to_record": "records", "load_record": "records", "payload_bytes": "records",
        "SliceError": "slices", "layout": "slices", "FedKSeed": "fedkseed", "FedKSeedError": "fedkseed"}
__all__ = list(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'edgetune.federated' has no attribute {name!r}")
    module = _API[name]
    if module != "slices":
        try:
            importlib.import_module("flwr")
        except ImportError as err:
            raise ModuleNotFoundError(f"edgetune.federated.{name} needs Flower ({err}): "
                                      "pip install 'edgetune[federated]'", name="flwr") from None
    return getattr(importlib.import_module(f"edgetune.federated.{module}"), name)
