"""Import a worker module in a child process where the named libraries cannot be imported, as on a bare
accelerator host that has torch and vidopt's light dependencies (pydantic, numpy, safetensors, pyyaml) only."""
from __future__ import annotations

import subprocess
import sys

# what an accelerator host may lack; a back-end imports the ones it needs inside the function that uses them
HOST_EXTRAS = ("av", "decord", "ray", "prefect", "mlflow", "boto3", "onnx", "onnxruntime", "onnxscript", "tensorrt",
               "torch_xla", "hls4ml")

_CHILD = """
import importlib, importlib.abc, sys
blocked = set(sys.argv[2:])
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"{name} is blocked in this test (not installed on the host it stands for)")
sys.meta_path.insert(0, Block())
importlib.import_module(sys.argv[1])
print("imported")
"""


def import_without(module: str, blocked: tuple[str, ...] = HOST_EXTRAS) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _CHILD, module, *blocked], capture_output=True, text=True)
