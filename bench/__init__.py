"""Benchmarks: edgetune against PyTorch eager, torch.compile and a forward-only floor."""
