"""Distillation stage on the tiny sample dataset: the teacher runs once over fixed clips (not once per epoch), the
student's loss falls, its model dir reloads to the same logits, a finished or resumed run never runs the teacher again,
and `python -m tasks.distill` killed with SIGKILL mid-training resumes from its checkpoint.

    .venv/bin/pytest tests/tasks/test_distill.py
"""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tasks import common, distill, ingest, train_teacher
from tests.tasks.test_train_teacher import capture_saved_logits, check_model_dir
from vidopt.checkpoint import load_checkpoint
from vidopt.config import load_config
from vidopt import train_jobs
from vidopt.stages import split_rows

REPO = Path(__file__).resolve().parents[2]
# A 1-epoch tiny teacher is enough to distill from; a small student keeps each epoch well under a second.
FAST = ["teacher.width=0.125", "teacher.epochs=1", "distill.conv_widths=[8,16,16,32]", "distill.temporal_widths=[32]",
        "distill.cached_clips_per_video=2", "distill.patience=10",
        "distill.check_teacher=false"]   # a 1-epoch tiny teacher is at chance: distil from it anyway, as the tests do


@pytest.fixture(scope="module")
def upstream(sample_dir, tmp_path_factory):
    """One project dir per module with the dataset and a teacher in it (what tiny_cfg does, shared by the tests here):
    the standalone run in the kill test then finds both cached, as a re-run of the pipeline would."""
    project = tmp_path_factory.mktemp("distill") / "project"

    def config(*overrides: str):
        return load_config("tiny", [f"run.project_dir={project}", f"data.source={sample_dir}", *FAST, *overrides])

    dataset = ingest.run(config())
    return config, dataset, train_teacher.run(config(), dataset)


class ListLogger:
    def __init__(self):
        self.values: dict[str, list[float]] = {}

    def log(self, name, value, step=None):
        self.values.setdefault(name, []).append(value)


def count_teacher_forwards(monkeypatch) -> dict:
    """Wrap every teacher a job loads so every forward pass (one per batch) is counted."""
    calls = {"batches": 0, "loads": 0}
    original = train_jobs.load_spec_model

    def load(spec, store, seed):
        model, arch = original(spec, store, seed)
        if arch.kind == "teacher":
            calls["loads"] += 1
            model.register_forward_pre_hook(lambda *_: calls.__setitem__("batches", calls["batches"] + 1))
        return model, arch

    monkeypatch.setattr(train_jobs, "load_spec_model", load)
    return calls


def test_distill_runs_the_teacher_once_and_trains_the_student(upstream, monkeypatch):
    config, dataset, teacher = upstream
    cfg = config("distill.epochs=3")
    calls = count_teacher_forwards(monkeypatch)
    saved = capture_saved_logits(monkeypatch, common)
    logger = ListLogger()

    student = distill.run(cfg, dataset, teacher, logger=logger)

    clips = len(split_rows(dataset, "train")) * cfg.distill.cached_clips_per_video
    assert calls == {"loads": 1, "batches": math.ceil(clips / cfg.clips.batch_size)}, "teacher ran more than once"
    losses = logger.values["distill.loss"]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert student.kind == "student" and student.arch["conv_widths"] == [8, 16, 16, 32]
    assert student.arch["frames"] == cfg.clips.frames and student.arch["num_classes"] == len(dataset.classes)
    m = student.metrics
    assert m["epochs_run"] == 3 and {"val_top1_clip", "val_top1_video", "test_top1_clip"} <= set(m)
    assert m["test_top1_gap_to_teacher"] == pytest.approx(teacher.metrics["test_top1_clip"] - m["test_top1_clip"])
    assert m["macs"] < teacher.metrics["macs"] and m["params"] < teacher.metrics["params"]
    check_model_dir(student, cfg, dataset, saved)

    # Finished: returned as it is, nothing trained, no teacher loaded.
    monkeypatch.setattr(distill, "run_training", lambda *a, **k: pytest.fail("trained again"))
    assert distill.run(cfg, dataset, teacher) == student
    assert calls["loads"] == 1

    # Crashed after training but before the model dir was written: the stored training result and the cached logits
    # finish the stage without running the teacher or training again, and give the same best weights.
    monkeypatch.undo()
    calls = count_teacher_forwards(monkeypatch)
    work = Path(student.uri).parent
    logits_mtime = (work / "teacher_logits.pt").stat().st_mtime_ns
    shutil.rmtree(student.uri)
    resumed = distill.run(cfg, dataset, teacher)
    assert calls["loads"] == 0 and (work / "teacher_logits.pt").stat().st_mtime_ns == logits_mtime
    assert resumed.weights_sha256 == student.weights_sha256 and resumed.metrics == student.metrics


@pytest.mark.integration
def test_distill_killed_mid_training_resumes_from_its_checkpoint(upstream, sample_dir, tmp_path):
    config, dataset, teacher = upstream
    epochs = 5
    cfg = config(f"distill.epochs={epochs}")
    project = Path(cfg.run.project_dir)
    # Where the subprocess will work (same key: same config, dataset and teacher as the cached ones it will find).
    work = distill.work_dir(cfg, dataset, teacher).local
    command = [sys.executable, "-m", "tasks.distill", "--profile", "tiny", f"run.project_dir={project}",
               f"data.source={sample_dir}", *FAST, f"distill.epochs={epochs}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log_file = tmp_path / "first.log"
    with open(log_file, "w") as out:
        first = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while not (work / "last.pt").exists():
                assert first.poll() is None, f"distill exited early:\n{log_file.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"no distill checkpoint:\n{log_file.read_text()[-3000:]}"
                time.sleep(0.05)
            first.send_signal(signal.SIGKILL)  # no cleanup, no atexit: as if the machine died
        finally:
            first.kill()  # on a failed assert above too: never leave it running
            first.wait()
    assert first.returncode == -signal.SIGKILL
    assert not (work / "model").exists(), "the run finished before it could be killed; raise the epochs"
    killed_after = load_checkpoint(work / "last.pt")["epoch"]
    assert 1 <= killed_after < epochs
    logits_mtime = (work / "teacher_logits.pt").stat().st_mtime_ns

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-3000:]
    resumed = re.search(r"distill: resumed from checkpoint after epoch (\d+)", output)
    assert resumed and int(resumed.group(1)) == killed_after, output[-3000:]
    assert re.search(r"train_teacher: .* not training again", output)  # the teacher came from its cache
    assert (work / "teacher_logits.pt").stat().st_mtime_ns == logits_mtime  # and did not run again
    (record,) = json.loads(second.stdout)  # stdout: the stage's artifact records
    assert record["kind"] == "student" and record["uri"] == str(work / "model")
    metrics = json.loads((work / "model" / "metrics.json").read_text())
    assert metrics["epochs_run"] == epochs and "val_top1_clip" in metrics and "test_top1_gap_to_teacher" in metrics
    assert len(re.findall(r"distill: epoch \d+/", output)) == epochs - killed_after  # only the rest ran


def test_a_teacher_at_chance_does_not_teach(sample_dir, tiny_cfg, monkeypatch):
    """teacher.epochs=0 leaves the teacher at its random start: distillation falls back to the labels, and the
    student is the one a labels-only recipe trains (alpha 1: the teacher's term weighs nothing), weight for weight."""
    cfg = tiny_cfg(f"data.source={sample_dir}", *FAST, "teacher.epochs=0", "distill.epochs=2",
                   "distill.check_teacher=true")
    dataset = ingest.run(cfg)
    teacher = train_teacher.run(cfg, dataset)
    fallback = distill.run(cfg, dataset, teacher)
    assert "not significantly better" in fallback.notes["teacher_check"]
    assert "labels only" in fallback.notes["distillation"]

    monkeypatch.setattr(distill, "teacher_check", lambda teacher, dataset: (True, "forced to teach"))
    labels_only = distill.run(tiny_cfg(f"data.source={sample_dir}", *FAST, "teacher.epochs=0", "distill.epochs=2",
                                       "distill.check_teacher=true", "distill.alpha=1.0"), dataset, teacher)
    assert "labels only" not in labels_only.notes["distillation"]
    assert labels_only.metrics["test_top1_clip"] == fallback.metrics["test_top1_clip"]
    a, b = (load_file(Path(s.uri) / "weights.safetensors") for s in (fallback, labels_only))
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-6


def test_compare_labels_only_keeps_the_student_better_on_val(upstream):
    config, dataset, teacher = upstream
    student = distill.run(config("distill.epochs=2", "distill.compare_labels_only=true"), dataset, teacher)
    check = student.notes["teacher_check"]
    scores = [float(x) for x in re.findall(r"(?:scored|alone) (\d\.\d+)", check)]
    assert "one from labels alone" in check and len(scores) == 2
    work = Path(student.uri).parent
    kept = "labels_only" if "labels-only student is kept" in check else "last"
    assert scores[1] > scores[0] if kept == "labels_only" else scores[1] <= scores[0]
    saved = load_file(work / "model" / "weights.safetensors")
    trained = load_file(work / f"{kept}.safetensors")
    assert all(torch.equal(saved[k], trained[k]) for k in saved)
