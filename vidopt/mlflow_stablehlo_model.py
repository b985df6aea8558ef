"""The MLflow model of the TPU target's StableHLO program (logged as code by vidopt/pyfunc.py; loading it needs
torch and torch-xla, which runs it on whatever PJRT device the process has: a TPU, or PJRT_DEVICE=CPU).

Input: decoded clips uint8 [B, T, H, W, 3] RGB. Output: logits float32 [B, classes]. The program takes one clip,
float [1, 3, T, H, W] normalised with the mean and std in its signature.json; every call compiles it again
(torch-xla 2.9), so this is for checking and small batches, not for serving throughput.
"""
import json
from pathlib import Path

import numpy as np
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class StableHloClipClassifier(PythonModel):
    def load_context(self, context) -> None:
        import torch_xla
        from torch_xla.stablehlo import StableHLOGraphModule

        program = Path(context.artifacts["program"])
        self.signature = json.loads((program / "signature.json").read_text())
        self.program = StableHLOGraphModule.load(str(program))
        self.device = torch_xla.device()

    def predict(self, context, model_input, params=None) -> np.ndarray:
        import torch

        clips = np.asarray(model_input)
        if clips.dtype != np.uint8 or clips.ndim != 5 or clips.shape[-1] != 3:
            raise ValueError(f"expected decoded clips uint8 [B, T, H, W, 3], got {clips.dtype} {clips.shape}")
        norm = self.signature["input"]["normalise"]
        x = (clips.astype(np.float32) / 255.0 - np.float32(norm["mean"])) / np.float32(norm["std"])
        x = np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3))                # [B, 3, T, H, W]
        out = []
        for clip in x:                                                       # the program's batch is 1
            logits = self.program(torch.from_numpy(clip[None]).to(self.device))
            out.append((logits[0] if isinstance(logits, (list, tuple)) else logits).cpu().numpy())
        return np.concatenate(out).astype(np.float32)


set_model(StableHloClipClassifier())
