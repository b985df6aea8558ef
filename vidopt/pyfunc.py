"""A target's ONNX package as an MLflow model: `mlflow.pyfunc.load_model("models:/vidopt-cpu@champion")` and
`mlflow models serve` run it on onnxruntime with the thread settings it was verified with (vidopt/mlflow_onnx_model.py,
logged as code: loading it needs numpy and onnxruntime, not vidopt)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

MODEL_CODE = Path(__file__).with_name("mlflow_onnx_model.py")


def log_onnx_model(package: Path, clip_shape: tuple[int, int, int], classes: list[str], sampling: dict | None = None,
                   name: str = "model"):
    """[MLflow] log the package folder (runtime.json and its ONNX file) as a pyfunc model in the active run -> its
    ModelInfo. clip_shape: (T, H, W); sampling: how its clips were cut from videos (clips.stride, seconds, resize),
    kept as metadata for whoever decodes videos for it (`vidopt predict`)."""
    import mlflow
    import onnxruntime
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    t, h, w = clip_shape
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, t, h, w, 3))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(classes)))]))
    return mlflow.pyfunc.log_model(
        name=name, python_model=str(MODEL_CODE), artifacts={"package": str(package)}, signature=signature,
        input_example=np.zeros((1, t, h, w, 3), np.uint8),
        # pinned here: inferring them would load the model in a subprocess on every run
        pip_requirements=[f"mlflow=={mlflow.__version__}", f"onnxruntime=={onnxruntime.__version__}",
                          f"numpy=={np.__version__}"],
        metadata={"classes": classes, "clips": sampling or {}, "input": "decoded clips uint8 [B, T, H, W, 3] RGB",
                  "output": "logits float32 [B, classes]"})
