"""The MLflow model of a GPU package that serves its AOTInductor program (logged as code by vidopt/pyfunc.py, so it
needs only numpy and torch where it is loaded or served).

Input: decoded clips uint8 [B, T, H, W, 3] RGB. Output: logits float32 [B, classes]. The package's runtime.json names
the .pt2 file, the device and dtype it was compiled for (cuda float16, or cpu float32 with its thread count) and the
normalisation its float input [B, 3, T, H, W] takes.
"""
import json
from pathlib import Path

import numpy as np
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

BATCH = 8


class AotiClipClassifier(PythonModel):
    def load_context(self, context) -> None:
        self.load_package(Path(context.artifacts["package"]))

    def load_package(self, package: Path) -> None:
        """Load the program as the target verified it: on its device and dtype, on CPU at its thread count (the
        generated kernels bake it in)."""
        import torch

        self.runtime = json.loads((package / "runtime.json").read_text())
        self.device, self.dtype = self.runtime["device"], getattr(torch, self.runtime["dtype"])
        if self.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"{package / self.runtime['file']} was compiled for CUDA and this host has no GPU")
        if self.device == "cpu":
            torch.set_num_threads(self.runtime.get("intra_op_num_threads", 1))
        self.runner = torch._inductor.aoti_load_package(str(package / self.runtime["file"]))
        norm = self.runtime["input"]["normalise"]
        self.mean, self.std = np.float32(norm["mean"]), np.float32(norm["std"])

    def predict(self, context, model_input, params=None) -> np.ndarray:
        import torch

        clips = np.asarray(model_input)
        if clips.dtype != np.uint8 or clips.ndim != 5 or clips.shape[-1] != 3:
            raise ValueError(f"expected decoded clips uint8 [B, T, H, W, 3], got {clips.dtype} {clips.shape}")
        out = []
        with torch.no_grad():
            for i in range(0, len(clips), BATCH):
                x = (clips[i:i + BATCH].astype(np.float32) / 255.0 - self.mean) / self.std   # [B, T, H, W, 3]
                x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))        # -> [B, 3, T, H, W]
                out.append(self.runner(x.to(self.device, self.dtype)).float().cpu().numpy())
        return np.concatenate(out).astype(np.float32)


set_model(AotiClipClassifier())
