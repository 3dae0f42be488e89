"""Frontends: a model in some framework -> the IR. torch.py takes a PyTorch model through
torch.export; a frontend for another format (ONNX) would sit beside it."""
