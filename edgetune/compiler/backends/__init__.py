"""Backends: running a scheduled graph. torch.py generates straight-line Python calling torch
kernels (CPU and CUDA); scratch.py measures what those kernels allocate, for the memory plan.
An exporter to another runtime (ONNX) would sit beside them and read edgetune.compiler.inputs."""
