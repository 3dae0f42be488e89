"""An exported training step (`Trainer.export_onnx`) run by onnxruntime alone: numpy,
onnxruntime and safetensors, no PyTorch. Where a phone, a board or a server has an ONNX
runtime, this is the whole of edgetune it needs.

    runner = StepRunner("exported/")
    loss = runner.step(images, labels)      # numpy arrays shaped like the export's batch
    runner.save("runner-state.safetensors")
"""
from edgetune.runtime.runner import RunnerError, StepRunner, put_part, trained_weights

__all__ = ["StepRunner", "RunnerError", "put_part", "trained_weights"]
