"""Evaluate a model on any labeled set, through the model's own runtime: top-1 per video (its windows averaged) with
its 95% interval, per clip too, recall per class and the confusion matrix.

    vidopt evaluate --data DIR|s3://bucket/prefix [--model PATH] [--profile demo] [key.sub=value ...]

DATA is laid out as for a run (`<label>/<file>`, or `data.manifest`); it is ingested like any source (verified
decoding, quarantine), every video a test video. MODEL is a model folder of a stage (arch.json + weights: PyTorch),
the quantize stage's folder (model_int8.onnx: onnxruntime int8), or the CPU target's package (`cpu_int8.tar.gz` or
its folder: the int8 file it ships); by default the newest quantize model in the profile's store. Clips are taken at
the model's own clip size.
"""
from __future__ import annotations

import json
import logging
import tarfile
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from tasks import ingest
from tasks.common import CLASSES, TrainingReads, eval_clip_set, load_clip_set
from vidopt.checkpoint import ARCH, load_model_dir
from vidopt.config import PipelineConfig
from vidopt.errors import VidoptError
from vidopt.metrics import per_video
from vidopt.onnx_utils import INT8_FILE
from vidopt.runtimes import Session, version
from vidopt.stages import open_store
from vidopt.stats import confusion, format_top1, per_class_recall, wilson_interval
from vidopt.storage import atomic_write_text
from vidopt.train_jobs import clip_logits
from vidopt.verdicts import confusion_png

log = logging.getLogger("vidopt.evaluate")


class EvaluateError(VidoptError, ValueError):
    """A model or data set that cannot be evaluated; the message says what to change."""


def newest_int8_model(cfg: PipelineConfig) -> Path:
    store = open_store(cfg.run)
    if not store.is_local:
        raise EvaluateError("evaluate: pass --model; finding the newest model is for a local store")
    found = sorted(store.local_path(store.uri("stages", "quantize")).glob(f"*/model/{INT8_FILE}"),
                   key=lambda p: p.stat().st_mtime)
    if not found:
        raise EvaluateError(f"evaluate: no quantize model under {store.spec.root}/stages/quantize; run the pipeline "
                            "or pass --model")
    return found[-1].parent


def open_model(path: Path, scratch: Path) -> tuple[str, Path, list[str], tuple[int, int, int]]:
    """(kind: "torch", the CPU runtime that runs its ONNX file (vidopt/runtimes.py) or "aotinductor", file or folder,
    class names, clip (T, H, W)) of a model folder or a CPU or GPU package: a package runs on the runtime it was
    verified on."""
    if path.is_file() and path.name.endswith(".tar.gz"):
        with tarfile.open(path) as tar:
            tar.extractall(scratch, filter="data")
        path = next(scratch.rglob("runtime.json")).parent
    if (path / "runtime.json").exists():   # a CPU or GPU target's package
        runtime = json.loads((path / "runtime.json").read_text())
        if not runtime.get("classes"):
            raise EvaluateError(f"evaluate: {path}/runtime.json names no classes (a package exported before it "
                                "did); evaluate the quantize stage's model folder instead")
        _, t, h, w = runtime["input"]["shape"]
        return runtime.get("runtime", "onnxruntime"), path / runtime["file"], runtime["classes"], (t, h, w)
    if not (path / ARCH).exists() or not (path / CLASSES).exists():
        raise EvaluateError(f"evaluate: {path} is not a model folder (arch.json and classes.json) nor a CPU package "
                            "(runtime.json)")
    arch = json.loads((path / ARCH).read_text())
    classes = json.loads((path / CLASSES).read_text())
    kind = "onnxruntime" if (path / INT8_FILE).exists() else "torch"
    return kind, path / INT8_FILE if kind != "torch" else path, classes, (arch["frames"], arch["height"], arch["width"])


def package_predictor(kind: str, file: Path):
    """Logits [N, classes] over batches of stored uint8 clips [B, T, H, W, 3], from a package's file on its runtime:
    an ONNX runtime (vidopt/runtimes.py) or the GPU package's AOTInductor program (its MLflow model's loader)."""
    if kind != "aotinductor":
        return Session(kind, file).predict
    from vidopt.mlflow_aoti_model import AotiClipClassifier

    program = AotiClipClassifier()
    try:
        program.load_package(file.parent)
    except RuntimeError as error:   # a CUDA program on a host without a GPU, or a package this torch cannot load
        raise EvaluateError(f"{file}: {error}") from None
    return lambda batches: np.concatenate([program.predict(None, np.asarray(b)) for b in batches])


def run(cfg: PipelineConfig, data: str, model: Path | None = None, out: Path | None = None) -> dict:
    model = model or newest_int8_model(cfg)
    with tempfile.TemporaryDirectory(prefix="vidopt-evaluate-") as scratch:
        kind, source, classes, (t, h, w) = open_model(model, Path(scratch))
        clips = cfg.clips.model_copy(update={"frames": t, "height": h, "width": w})
        data_cfg = cfg.data.model_copy(update={"source": data, "split_fractions": (0.0, 0.0, 1.0), "stratify": False,
                                               "sample_if_missing": False})
        cfg = cfg.model_copy(update={"clips": clips, "data": data_cfg})
        dataset = ingest.run(cfg)
        unknown = sorted(set(dataset.classes) - set(classes))
        if unknown:
            raise EvaluateError(f"evaluate: {data} has labels the model does not know: {unknown} (it knows "
                                f"{classes})")
        store = open_store(cfg.run)
        ref = eval_clip_set(TrainingReads.of(cfg), dataset, "test")
        test = load_clip_set(store, ref)
        batch = cfg.clips.batch_size
        if kind != "torch":
            logits = package_predictor(kind, source)([test.clips[i:i + batch] for i in range(0, len(test.labels),
                                                                                             batch)])
        else:
            module, _ = load_model_dir(source)
            logits = clip_logits(module, test.clips, batch, torch.device("cpu")).numpy()
    # the data's label indices -> the model's
    labels = np.array([classes.index(dataset.classes[i]) for i in test.labels.tolist()])
    # statistics count videos (each one's windows averaged), as the pipeline's do
    video_logits, video_labels = per_video(logits, labels, test.videos.numpy())
    predicted = video_logits.argmax(1)
    right = int((predicted == video_labels).sum())
    matrix = confusion(video_labels, predicted, len(classes))
    ran_on = ("PyTorch fp32" if kind == "torch" else f"torch {torch.__version__} AOTInductor" if kind == "aotinductor"
              else f"{version(kind)} {'int8' if 'int8' in source.name else 'fp32'}")
    report = {"model": str(model), "runtime": ran_on,
              "data": data, "data_version": dataset.data_version, "videos": dataset.num_videos,
              "quarantined": dataset.num_quarantined, "clips": len(labels),
              "top1": right / max(len(video_labels), 1), "top1_ci": wilson_interval(right, len(video_labels)),
              "top1_text": format_top1(right, len(video_labels)),
              "top1_clip": float((logits.argmax(1) == labels).mean()) if len(labels) else float("nan"),
              "classes": classes, "recall": per_class_recall(matrix), "confusion": matrix.tolist(),
              "written": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    out = out or Path(cfg.run.project_dir).resolve() / "evaluate" / dataset.data_version
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "evaluation.json", json.dumps(report, indent=2))
    (out / "confusion.png").write_bytes(confusion_png(matrix.tolist(), classes, f"{model.name} on {data}"))
    report["out"] = str(out)
    return report


def format_report(report: dict) -> str:
    lines = [f"model {report['model']} ({report['runtime']}) on {report['data']}: {report['videos']} videos, "
             f"{report['quarantined']} quarantined, {report['clips']} clips",
             f"top-1 per video {report['top1_text']}; per clip {100 * report['top1_clip']:.1f}%",
             "recall per class:"]
    lines += [f"  {c:<16} {'-' if r is None else f'{100 * r:.1f}%'}" for c, r in zip(report["classes"],
                                                                                       report["recall"])]
    return "\n".join(lines + [f"confusion matrix and numbers: {report['out']}"])
