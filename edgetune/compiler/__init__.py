"""The compiler: a PyTorch model and a scheme in, one compiled training step out.

The pipeline, in the order a step is built (`compile` in trainer.py drives it):

    frontend/   torch.export -> the IR (`frontend/torch.py`; ONNX and others would go here)
    ir/         the IR: Node, Graph, Builder, and the op vocabulary (`ir/ops/`: one `register`
                call per op with its kernel, gradient, scratch and in-place twin)
    scheme.py   what trains: whole tensors, channel ratios, LoRA ranks (`edgetune.schemes`)
    lora.py     LoRA rules rewrite their linears to run adapters, before autodiff
    autodiff.py the backward, pruned to what the scheme trains
    optim.py    SGD, AdamW, Adafactor and GaLore as update ops in the graph, MeZO's settings (a new optimizer goes here)
    passes/     Graph -> Graph optimizations, each with why it runs (a new pass goes here)
    memory.py   lifetimes and the predicted peak of one step
    inputs.py   what every input of the step is (parameter, optimizer state, batch, ...)
    backends/   running the graph: torch.py generates Python calling torch kernels
                (invariants.py hoists what every step computes alike out of it, grouped.py
                runs small updates as multi-tensor ops); onnx.py writes the whole step as one plain ONNX graph (run by
                edgetune.runtime without torch); ort.py runs that graph in an
                onnxruntime session behind the Trainer; choice.py picks the backend
                (`compile(backend=...)`, "auto" times them); scratch.py measures what
                the torch kernels allocate (a new backend goes here)
    report.py   the per-layer report of a compiled step
    trainer.py  `compile` and the Trainer, the compiler's face: binds the step to the model
    checkpoint.py  the Trainer's state as one safetensors file (no pickle, with a digest)
    isolate.py  compiling in a forked child, so the training process stays lean

Nothing here imports from edgetune.apps or edgetune.cli: they are built on this package.
"""
