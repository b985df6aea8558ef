"""The MLflow model of an ONNX target package (logged as code by vidopt/pyfunc.py, so it needs only numpy and
onnxruntime where it is loaded or served).

Input: decoded clips uint8 [B, T, H, W, 3] RGB. Output: logits float32 [B, classes]. The package's runtime.json names
the ONNX file, the execution providers to run it on, its thread settings and what its input is: uint8 pixels
[B, 3, T, H, W], or float clips normalised with the given mean and std.
"""
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

BATCH = 8


class OnnxClipClassifier(PythonModel):
    def load_context(self, context) -> None:
        package = Path(context.artifacts["package"])
        self.runtime = json.loads((package / "runtime.json").read_text())
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.runtime.get("intra_op_num_threads", 1)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # the providers runtime.json names that this onnxruntime build has, in its order; the CPU one always
        providers = [p for p in self.runtime.get("providers", []) if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(str(package / self.runtime["file"]), options,
                                            providers=providers or ["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def predict(self, context, model_input, params=None) -> np.ndarray:
        clips = np.asarray(model_input)
        if clips.dtype != np.uint8 or clips.ndim != 5 or clips.shape[-1] != 3:
            raise ValueError(f"expected decoded clips uint8 [B, T, H, W, 3], got {clips.dtype} {clips.shape}")
        out = [self.session.run(None, {self.input: self._model_input(clips[i:i + BATCH])})[0]
               for i in range(0, len(clips), BATCH)]
        return np.concatenate(out).astype(np.float32)

    def _model_input(self, clips: np.ndarray) -> np.ndarray:
        """[B, T, H, W, 3] uint8 -> what the file reads, [B, 3, T, H, W]."""
        norm = self.runtime["input"].get("normalise")
        if norm is None:
            return np.ascontiguousarray(clips.transpose(0, 4, 1, 2, 3))
        x = (clips.astype(np.float32) / 255.0 - np.float32(norm["mean"])) / np.float32(norm["std"])
        return np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3), dtype=np.float32)


set_model(OnnxClipClassifier())
