"""A target's package as an MLflow model: `mlflow.pyfunc.load_model("models:/vidopt-cpu@champion")` and `mlflow models
serve` run it as the target was verified. ONNX packages (CPU, GPU) run on the runtime their runtime.json names,
onnxruntime or OpenVINO (vidopt/mlflow_onnx_model.py: numpy and that runtime, not vidopt); a GPU package that serves
its AOTInductor program on torch (vidopt/mlflow_aoti_model.py); the TPU's StableHLO
program on torch-xla (vidopt/mlflow_stablehlo_model.py); the FPGA's HLS project in hls4ml's C++ emulation
(vidopt/mlflow_hls_model.py). All are logged as code."""
from __future__ import annotations

from pathlib import Path

import numpy as np

MODEL_CODE = Path(__file__).with_name("mlflow_onnx_model.py")
STABLEHLO_CODE = Path(__file__).with_name("mlflow_stablehlo_model.py")
HLS_CODE = Path(__file__).with_name("mlflow_hls_model.py")
AOTI_CODE = Path(__file__).with_name("mlflow_aoti_model.py")


def log_stablehlo_model(program: Path, clip_shape: tuple[int, int, int], classes: list[str],
                        sampling: dict | None = None, name: str = "model"):
    """[MLflow] the TPU target's StableHLO program folder as a pyfunc model (torch-xla runs it) -> its ModelInfo.
    No input example: checking it would start a PJRT client in this process, which the TPU target keeps out of
    long-lived ones."""
    from importlib.metadata import version

    import mlflow

    return _log(name, STABLEHLO_CODE, {"program": str(program)}, clip_shape, classes, sampling,
                [f"mlflow=={mlflow.__version__}", f"torch=={version('torch').split('+')[0]}",
                 f"torch-xla=={version('torch-xla').split('+')[0]}", f"numpy=={np.__version__}"], example=False)


def log_hls_model(project: Path, clip_shape: tuple[int, int, int], classes: list[str], sampling: dict | None = None,
                  name: str = "model"):
    """[MLflow] the FPGA target's HLS project as a pyfunc model (hls4ml's C++ emulation, compiled where it loads) ->
    its ModelInfo. No input example: checking it would compile both IPs here."""
    from importlib.metadata import version

    import mlflow

    return _log(name, HLS_CODE, {"project": str(project)}, clip_shape, classes, sampling,
                [f"mlflow=={mlflow.__version__}", f"hls4ml=={version('hls4ml')}", f"numpy=={np.__version__}"],
                example=False)


def log_onnx_model(package: Path, clip_shape: tuple[int, int, int], classes: list[str], sampling: dict | None = None,
                   name: str = "model"):
    """[MLflow] log the package folder (runtime.json and its ONNX file) as a pyfunc model in the active run -> its
    ModelInfo. clip_shape: (T, H, W); sampling: how its clips were cut from videos (clips.stride, seconds, resize),
    kept as metadata for whoever decodes videos for it (`vidopt predict`)."""
    import json
    from importlib.metadata import version

    import mlflow

    runtime = json.loads((package / "runtime.json").read_text()).get("runtime", "onnxruntime")
    needs = "openvino" if runtime.startswith("openvino") else "onnxruntime"   # the runtime the package ships on
    return _log(name, MODEL_CODE, {"package": str(package)}, clip_shape, classes, sampling,
                [f"mlflow=={mlflow.__version__}", f"{needs}=={version(needs)}", f"numpy=={np.__version__}"])


def log_aoti_model(package: Path, clip_shape: tuple[int, int, int], classes: list[str], sampling: dict | None = None,
                   name: str = "model"):
    """[MLflow] a GPU package whose runtime.json names its AOTInductor program as a pyfunc model -> its ModelInfo.
    No input example: a program compiled for CUDA loads only on a GPU host, and this one may have none."""
    from importlib.metadata import version

    import mlflow

    return _log(name, AOTI_CODE, {"package": str(package)}, clip_shape, classes, sampling,
                [f"mlflow=={mlflow.__version__}", f"torch=={version('torch').split('+')[0]}",
                 f"numpy=={np.__version__}"], example=False)


def _log(name: str, code: Path, artifacts: dict, clip_shape: tuple[int, int, int], classes: list[str],
         sampling: dict | None, requirements: list[str], example: bool = True):
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    t, h, w = clip_shape
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, t, h, w, 3))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(classes)))]))
    return mlflow.pyfunc.log_model(
        name=name, python_model=str(code), artifacts=artifacts, signature=signature,
        input_example=np.zeros((1, t, h, w, 3), np.uint8) if example else None,
        pip_requirements=requirements,   # pinned here: inferring them would load the model in a subprocess each run
        metadata={"classes": classes, "clips": sampling or {}, "input": "decoded clips uint8 [B, T, H, W, 3] RGB",
                  "output": "logits float32 [B, classes]"})
