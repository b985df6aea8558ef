"""The MLflow model of the FPGA target's HLS project (logged as code by vidopt/pyfunc.py): its two IPs compiled by
hls4ml into their bit-accurate C++ emulation when the model loads (g++ needed), run as the FPGA would, the frame
differences computed on the host. Slow (seconds a clip): for checking what the FPGA will answer, not for serving.

Input: decoded clips uint8 [B, T, H, W, 3] RGB. Output: logits float32 [B, classes].
"""
import json
import os
from pathlib import Path

import numpy as np
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class HlsClipClassifier(PythonModel):
    def load_context(self, context) -> None:
        from hls4ml.converters import link_existing_project

        root = Path(context.artifacts["project"])
        self.spec = json.loads((root / "runtime.json").read_text())
        here = os.getcwd()
        os.chdir(root)   # the projects' paths are relative to the archive's root
        try:
            self.ips = [link_existing_project(name) for name in self.spec["ips"]]
            for ip in self.ips:
                ip.compile()
        finally:
            os.chdir(here)

    def predict(self, context, model_input, params=None) -> np.ndarray:
        clips = np.asarray(model_input)
        if clips.dtype != np.uint8 or clips.ndim != 5 or clips.shape[-1] != 3:
            raise ValueError(f"expected decoded clips uint8 [B, T, H, W, 3], got {clips.dtype} {clips.shape}")
        norm = self.spec["input"]["normalise"]
        x = (clips.astype(np.float32) / 255.0 - np.float32(norm["mean"])) / np.float32(norm["std"])  # [B, T, H, W, 3]
        if self.spec["frame_differences"]:   # each frame, then the next minus it (zeros for the last)
            following = np.concatenate([x[:, 1:], x[:, -1:]], axis=1)
            x = np.concatenate([x, following - x], axis=-1)                                    # [B, T, H, W, 6]
        b, t = x.shape[:2]
        encoder, head = self.ips
        features = np.asarray(encoder.predict(np.ascontiguousarray(x.reshape(b * t, *x.shape[2:]))))
        logits = head.predict(np.ascontiguousarray(features.reshape(b, t, self.spec["feature_dim"])))
        return np.asarray(logits, np.float32).reshape(b, -1)


set_model(HlsClipClassifier())
