"""What every back-end needs: a job's inputs from the artifact store and its outputs back there, the eval clips, the
PyTorch reference logits, parity and top-1, archiving.

Kept free of Ray, Prefect and accelerator libraries so each back-end stays importable on its own machine.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from vidopt.artifacts import ExportJob, LocalExportJob, TargetResult
from vidopt.checkpoint import load_model_dir
from vidopt.data import normalise_clips
from vidopt.metrics import per_video
from vidopt.stats import pack_correct
from vidopt.store import ArtifactStore

EVAL_BATCH = 8
VERIFIED_LOGITS = "verified_logits.npy"   # a target's logits over the eval clips, beside its package


class Truth(NamedTuple):
    """What the eval clips are: labels [N] and the video each clip comes from [N] (a video's windows are scored as
    one)."""
    labels: np.ndarray
    videos: np.ndarray

    def head(self, n: int) -> Truth:
        return Truth(self.labels[:n], self.videos[:n])


def load_eval_clips(job: LocalExportJob) -> tuple[torch.Tensor, Truth]:
    """-> (clips [N, C, T, H, W] float normalised, truth) from the job's uint8 clip file."""
    stored, truth = load_stored_clips(job)
    return normalise_clips(stored), truth


def load_stored_clips(job: LocalExportJob) -> tuple[torch.Tensor, Truth]:
    """-> (clips [N, T, H, W, C] uint8 as stored, truth): what an ONNX model is fed through
    vidopt.onnx_utils.ort_predict, which gives a pixel model its pixels and a float model normalised clips."""
    saved = torch.load(job.eval_clips, map_location="cpu", weights_only=True)
    return saved["clips"], Truth(saved["labels"].numpy(), saved["videos"].numpy())


def run_export_job(job: ExportJob, run_target) -> TargetResult:
    """An ExportJob on this node: its inputs fetched from the store into the node cache, `run_target` on them, its
    output folder published to job.out, and every local path in the result replaced by its store URI."""
    import hashlib
    import shutil

    store = ArtifactStore(job.store)
    model_dir = store.get_dir(job.model)
    if store.is_local:
        out_dir = store.local_path(job.out)
    else:
        out_dir = store.cache_dir / "export" / hashlib.sha256(job.out.encode()).hexdigest()[:16]
    shutil.rmtree(out_dir, ignore_errors=True)   # an earlier attempt's leftovers are not this job's output
    out_dir.mkdir(parents=True)
    local = LocalExportJob(target=job.target, model_dir=str(model_dir), int8_dir=str(model_dir),
                           eval_clips=str(store.get_file(job.eval_clips)), out_dir=str(out_dir), options=job.options)
    result = run_target(local)
    store.put_dir(out_dir, job.out)
    return TargetResult.model_validate(_in_store(result.model_dump(), str(out_dir), job.out))


def _in_store(value, local: str, uri: str):
    """`value` with every string under the local folder rewritten to the same place under `uri`."""
    if isinstance(value, dict):
        return {k: _in_store(v, local, uri) for k, v in value.items()}
    if isinstance(value, list):
        return [_in_store(v, local, uri) for v in value]
    if isinstance(value, str) and (value == local or value.startswith(local + "/")):
        return uri + value[len(local):]
    return value


def batches(x: torch.Tensor, size: int = EVAL_BATCH):
    return [x[i:i + size] for i in range(0, len(x), size)]


@torch.no_grad()
def reference_logits(job: LocalExportJob, x: torch.Tensor) -> np.ndarray:
    """The fp32 PyTorch model's logits: what every target must reproduce."""
    model, _ = load_model_dir(job.model_dir)
    return np.concatenate([model(b).numpy() for b in batches(x)])


def parity(logits: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    return {"max_abs_diff": float(np.abs(logits - reference).max()),
            "argmax_agreement": float((logits.argmax(1) == reference.argmax(1)).mean())}


def top1(logits: np.ndarray, truth: Truth) -> float:
    """Top-1 per clip."""
    return float((logits.argmax(1) == truth.labels).mean())


def correct(logits: np.ndarray, truth: Truth) -> str:
    """Which videos the logits get right (each video's windows averaged), packed (vidopt/stats.py): the registry
    tests a challenger against the champion on the same videos."""
    video_logits, video_labels = per_video(logits, truth.labels, truth.videos)
    return pack_correct(video_logits.argmax(1) == video_labels)


def model_classes(job: LocalExportJob) -> list[str] | None:
    """The class names of the job's model, in logit order (the model folder's classes.json)."""
    import json

    path = Path(job.model_dir) / "classes.json"
    return json.loads(path.read_text()) if path.exists() else None


def onnx_runtime_json(file: str, providers: list[str], threads: int, shape: list[int], pixels: bool,
                      classes: list[str] | None, **extra) -> dict:
    """runtime.json of an ONNX package: which file runs where, and what it reads (the MLflow model of the package,
    vidopt/mlflow_onnx_model.py, follows it)."""
    from vidopt.data import KINETICS_MEAN, KINETICS_STD
    from vidopt.onnx_utils import INPUT_NAME, OUTPUT_NAME, input_layout

    return {"file": file, "providers": providers, "intra_op_num_threads": threads, "inter_op_num_threads": 1,
            "execution_mode": "ORT_SEQUENTIAL", **extra,
            "input": {"name": INPUT_NAME, "dtype": "uint8" if pixels else "float32", "layout": input_layout(pixels),
                      "shape": shape,
                      **({} if pixels else {"normalise": {"mean": list(KINETICS_MEAN), "std": list(KINETICS_STD)}})},
            "output": {"name": OUTPUT_NAME, "layout": "[B, classes] logits"}, "classes": classes}


def archive(src: Path, dest: Path) -> Path:
    """tar.gz of a directory, written beside and renamed into place (whole or absent)."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(src, arcname=src.name)
    tmp.replace(dest)
    return dest


def run_module(module: str, args: list[str], timeout_s: float, env: dict[str, str] | None = None,
               timeout_note: str = "") -> subprocess.CompletedProcess:
    """`python -m module args...` in a fresh process that imports `workers` and `vidopt` from wherever this process
    found them; a child that outlives `timeout_s` (a hung compile, a device that never answers) is killed and comes
    back as exit -9 with the reason (and `timeout_note`, say the option that sets the limit), a failed job rather
    than a crash of this one."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", module, *args]
    try:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(command, -9, "", f"no answer after {timeout_s:g} s {timeout_note}".strip())
