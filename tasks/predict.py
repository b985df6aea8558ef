"""Classify videos with a vidopt model: each video decoded the way ingestion verifies (PyAV counts the frames, decord
only where it matched PyAV), the model's clip window slid over it, the windows' logits averaged into the video's label.

    vidopt predict PATH|DIR|s3://bucket/prefix [--model models:/vidopt-cpu@champion | PATH] [--stride FRAMES]
                   [--eval-windows] [--json] [--workers N] [--profile demo] [key.sub=value ...]

MODEL is a registered MLflow model (`models:/<name>@<alias>` or `models:/<name>/<version>`, run through
mlflow.pyfunc), a CPU target package (`cpu_int8.tar.gz` or its folder) or a stage's model folder; by default the
project's `vidopt-cpu@champion`, else its newest int8 model. Windows start `--stride` frames apart (default: one clip
span, back to back; `clips.seconds` spans follow each video's frame rate); `--eval-windows` takes the windows the
pipeline's evaluation scores instead. A file that cannot be decoded gets its reason and the others go on.
"""
from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from vidopt.config import ClipConfig, PipelineConfig
from vidopt.errors import VidoptError
from vidopt.processes import spawn_pool
from vidopt.storage import DownloadCache, StorageError, is_s3, list_objects

log = logging.getLogger("vidopt.predict")
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv"}
Predictor = Callable[[np.ndarray], np.ndarray]   # clips uint8 [B, T, H, W, 3] -> logits [B, classes]


class PredictError(VidoptError, ValueError):
    """A model or input that cannot be used; the message says what to change."""


@dataclass
class VideoPrediction:
    video: str
    label: str | None = None
    score: float | None = None               # the label's softmax probability over the averaged logits
    windows: list[str] = field(default_factory=list)    # each window's label, in time order
    starts: list[int] = field(default_factory=list)     # each window's first frame
    error: str | None = None


@dataclass
class Model:
    predict: Predictor
    classes: list[str]
    clips: ClipConfig                        # the clip size it reads (frames, height, width)
    name: str


def window_starts(num_frames: int, span: int, stride: int) -> list[int]:
    """First frames of windows `stride` apart that fit in the video (one at 0 for a video shorter than a window)."""
    if num_frames <= span:
        return [0]
    return list(range(0, num_frames - span + 1, max(1, stride)))


def decode_windows(path: str, clips: ClipConfig, stride: int | None, eval_windows: bool,
                   decoder_checks: int) -> tuple[np.ndarray, list[int]]:
    """-> (clips uint8 [W, T, H, W, 3], window starts) of one video; raises DecodeError/OSError with the reason."""
    from vidopt.data import clip_stride, crop_to_clip, decode_size, eval_windows as n_eval_windows, sample_clip_indices
    from vidopt.ingestion import inspect_file
    from vidopt.video import DecodeError, read_frames

    found = inspect_file(path, decoder_checks)
    if not found.pop("ok"):
        raise DecodeError(found["reason"])
    step = clip_stride(found, clips)
    span = (clips.frames - 1) * step + 1
    if eval_windows or found["num_frames"] <= span:   # the windows evaluation scores (a short video: its one)
        n = n_eval_windows(found, clips)
        indices = [sample_clip_indices(found["num_frames"], clips.frames, step, train=False, clip=c, clips=n)
                   for c in range(n)]
    else:
        indices = [list(range(s, s + span, step)) for s in window_starts(found["num_frames"], span, stride or span)]
    # every frame any window needs, decoded in one pass (PyAV decodes from the start on each call), then the windows
    needed = sorted({i for ix in indices for i in ix})
    decoded = read_frames(path, needed, decoder=found["decoder"], size=decode_size(found, clips))  # [F, h, w, 3]
    at = {frame: row for row, frame in enumerate(needed)}
    windows = [crop_to_clip(decoded[[at[i] for i in ix]], clips) for ix in indices]
    return np.stack([np.asarray(w) for w in windows]), [ix[0] for ix in indices]


def _decode_job(args: tuple) -> tuple[np.ndarray | None, list[int], str | None]:
    try:
        windows, starts = decode_windows(*args)
        return windows, starts, None
    except Exception as err:  # noqa: BLE001 - any decoder failure is this file's line, not the run's end
        return None, [], str(err) or type(err).__name__


def list_videos(source: str, cfg: PipelineConfig) -> list[tuple[str, str]]:
    """(name shown, local path) of a file, every video file under a folder, or every object under an s3:// prefix
    (downloaded into the project's cache)."""
    if not is_s3(source) and Path(source).is_file():
        return [(source, str(Path(source).resolve()))]
    try:
        objects = list_objects(source, cfg.data.s3_endpoint_url, cfg.data.s3_region)
    except StorageError as err:
        raise PredictError(f"predict: {err}") from None
    objects = [o for o in objects if Path(o.key).suffix.lower() in VIDEO_SUFFIXES]
    if not objects:
        raise PredictError(f"predict: no video files ({', '.join(sorted(VIDEO_SUFFIXES))}) under {source}")
    cache = DownloadCache(Path(cfg.run.project_dir) / "cache" / "objects", source, cfg.data.s3_endpoint_url,
                          cfg.data.s3_region)
    return [(o.key, str(cache.local_path(o))) for o in objects]


def load_model(spec: str | None, cfg: PipelineConfig, scratch: Path) -> Model:
    """A registered MLflow model, a CPU or GPU package or a model folder (tasks/evaluate.py open_model), as a
    Predictor."""
    from tasks.evaluate import newest_int8_model, open_model, package_predictor

    if spec is None or spec.startswith("models:/"):
        import mlflow

        from vidopt.tracking import configure_mlflow

        configure_mlflow(cfg)
        uri = spec or "models:/vidopt-cpu@champion"
        try:
            model = mlflow.pyfunc.load_model(uri)
        except Exception as err:  # noqa: BLE001 - MLflow raises its own types for a missing model or alias
            if spec is not None:
                raise PredictError(f"predict: cannot load {uri} as an MLflow model ({err}); a version whose source "
                                   "is a package archive runs with --model <the .tar.gz>") from None
            return load_model(str(newest_int8_model(cfg)), cfg, scratch)   # no champion yet: the newest int8
        _, t, h, w, _ = model.metadata.get_input_schema().inputs[0].shape
        sampling = model.metadata.metadata.get("clips") or {}   # how its training clips were cut
        clips = cfg.clips.model_copy(update={**sampling, "frames": t, "height": h, "width": w})
        return Model(lambda x: np.asarray(model.predict(x)), list(model.metadata.metadata["classes"]), clips, uri)
    kind, source, classes, (t, h, w) = open_model(Path(spec), scratch)
    clips = cfg.clips.model_copy(update={"frames": t, "height": h, "width": w})
    if kind != "torch":   # on the runtime the package was verified on
        predict = package_predictor(kind, source)
        return Model(lambda x: predict([x]), classes, clips, spec)
    import torch

    from vidopt.checkpoint import load_model_dir
    from vidopt.train_jobs import clip_logits

    module, _ = load_model_dir(source)
    return Model(lambda x: clip_logits(module, torch.from_numpy(x), 8, torch.device("cpu")).numpy(), classes, clips,
                 spec)


def run(cfg: PipelineConfig, source: str, model: str | None = None, stride: int | None = None,
        eval_windows: bool = False, workers: int = 2, progress: Callable[[int, int], None] | None = None) -> dict:
    """-> {"model", "videos": [VideoPrediction as dict], "clips", "seconds", "clips_per_s", "videos_per_s"}."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vidopt-predict-") as scratch:
        m = load_model(model, cfg, Path(scratch))
        videos = list_videos(source, cfg)
        jobs = [(path, m.clips, stride, eval_windows, cfg.data.decoder_checks) for _, path in videos]
        results, clips = [], 0
        with spawn_pool(max(1, workers)) as pool:    # decoding in parallel; the model runs here, a video at a time
            for done, ((name, _), (windows, starts, error)) in enumerate(zip(videos, pool.map(_decode_job, jobs)), 1):
                if error is not None:
                    results.append(VideoPrediction(name, error=error))
                else:
                    logits = m.predict(windows)
                    mean = logits.mean(0)
                    probs = np.exp(mean - mean.max()) / np.exp(mean - mean.max()).sum()
                    results.append(VideoPrediction(name, m.classes[int(mean.argmax())], float(probs.max()),
                                                   [m.classes[int(i)] for i in logits.argmax(1)], starts))
                    clips += len(windows)
                if progress is not None:
                    progress(done, len(videos))
    seconds = time.monotonic() - started
    return {"model": m.name, "classes": m.classes, "videos": [asdict(r) for r in results], "clips": clips,
            "seconds": seconds, "clips_per_s": clips / seconds, "videos_per_s": len(results) / seconds}


def format_table(report: dict, max_windows: int = 12) -> str:
    rows = report["videos"]
    width = max([len("video"), *(len(r["video"]) for r in rows)])
    lines = [f"{'video':<{width}}  {'label':<14} {'score':>6}  windows"]
    for r in rows:
        if r["error"]:
            lines.append(f"{r['video']:<{width}}  failed: {r['error']}")
            continue
        shown = " ".join(r["windows"][:max_windows]) + (" ..." if len(r["windows"]) > max_windows else "")
        lines.append(f"{r['video']:<{width}}  {r['label']:<14} {r['score']:6.3f}  {shown}")
    failed = sum(1 for r in rows if r["error"])
    lines.append(f"{len(rows) - failed} videos classified, {failed} failed, {report['clips']} clips with "
                 f"{report['model']} in {report['seconds']:.1f} s: {report['clips_per_s']:.1f} clips/s, "
                 f"{report['videos_per_s']:.2f} videos/s")
    return "\n".join(lines)
