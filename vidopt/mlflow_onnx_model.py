"""The MLflow model of an ONNX target package (logged as code by vidopt/pyfunc.py, so it needs only numpy and the
package's runtime, onnxruntime or OpenVINO, where it is loaded or served).

Input: decoded clips uint8 [B, T, H, W, 3] RGB. Output: logits float32 [B, classes]. The package's runtime.json names
the ONNX file, the runtime it was verified on (`runtime`: onnxruntime, openvino or openvino-bf16; onnxruntime where
absent) with its execution providers and thread settings, and what its input is: uint8 pixels [B, 3, T, H, W], or
float clips normalised with the given mean and std.
"""
import functools
import json
from pathlib import Path

import numpy as np
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

BATCH = 8


@functools.cache
def _openvino_core():
    """The process's one OpenVINO Core, never destroyed (why: vidopt/runtimes.py openvino_core)."""
    import openvino as ov

    return ov.Core()


class OnnxClipClassifier(PythonModel):
    def load_context(self, context) -> None:
        package = Path(context.artifacts["package"])
        self.runtime = json.loads((package / "runtime.json").read_text())
        self.openvino = self.runtime.get("runtime", "onnxruntime").startswith("openvino")
        if self.openvino:
            self._load_openvino(package)
            return
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.runtime.get("intra_op_num_threads", 1)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # the providers runtime.json names that this onnxruntime build has, in its order; the CPU one always
        providers = [p for p in self.runtime.get("providers", []) if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(str(package / self.runtime["file"]), options,
                                            providers=providers or ["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def _load_openvino(self, package: Path) -> None:
        """OpenVINO's CPU plugin as the target verified it: its precision hint and threads, one stream, compiled
        per input shape (a static shape runs faster than a dynamic batch)."""
        self.core, self.compiled = _openvino_core(), {}
        self.model = self.core.read_model(str(package / self.runtime["file"]))
        self.config = {"INFERENCE_NUM_THREADS": self.runtime.get("intra_op_num_threads", 1), "NUM_STREAMS": 1,
                       "PERFORMANCE_HINT": "LATENCY",
                       "INFERENCE_PRECISION_HINT": "bf16" if self.runtime["runtime"].endswith("bf16") else "f32"}

    def _run(self, x: np.ndarray) -> np.ndarray:
        if not self.openvino:
            return self.session.run(None, {self.input: x})[0]
        request = self.compiled.get(x.shape)
        if request is None:
            import openvino as ov

            model = self.model.clone()
            model.reshape({model.inputs[0].any_name: ov.PartialShape(list(x.shape))})
            request = self.compiled[x.shape] = self.core.compile_model(model, "CPU", self.config).create_infer_request()
        request.infer({0: x})
        return request.get_output_tensor(0).data.copy()

    def predict(self, context, model_input, params=None) -> np.ndarray:
        clips = np.asarray(model_input)
        if clips.dtype != np.uint8 or clips.ndim != 5 or clips.shape[-1] != 3:
            raise ValueError(f"expected decoded clips uint8 [B, T, H, W, 3], got {clips.dtype} {clips.shape}")
        out = [self._run(self._model_input(clips[i:i + BATCH])) for i in range(0, len(clips), BATCH)]
        return np.concatenate(out).astype(np.float32)

    def _model_input(self, clips: np.ndarray) -> np.ndarray:
        """[B, T, H, W, 3] uint8 -> what the file reads, [B, 3, T, H, W]."""
        norm = self.runtime["input"].get("normalise")
        if norm is None:
            return np.ascontiguousarray(clips.transpose(0, 4, 1, 2, 3))
        x = (clips.astype(np.float32) / 255.0 - np.float32(norm["mean"])) / np.float32(norm["std"])
        return np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3), dtype=np.float32)


set_model(OnnxClipClassifier())
