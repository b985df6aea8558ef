"""Teacher stage on the tiny sample dataset: trains (loss falls), logs to MLflow, writes a model dir that reloads to the
same logits, is not trained twice, and starts from a user's state_dict when `teacher.init` names one.

    .venv/bin/pytest tests/tasks/test_train_teacher.py
"""
import json
import re
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from tasks import common, ingest, train_teacher
from vidopt import train_jobs
from vidopt.checkpoint import load_model_dir
from vidopt.models import TeacherArch, build_model
from vidopt.stages import split_rows
from vidopt.distillation import decode_clip_set
from vidopt.tracking import configure_mlflow
from vidopt.training import evaluate

# Small enough for seconds per epoch on 2 shared cores; still a real r3d_18 (widths 8/16/32/64).
TEACHER = ["teacher.width=0.125", "teacher.epochs=3", "teacher.patience=10"]
MODEL_FILES = {"weights.safetensors", "arch.json", "metrics.json", "config.json", "notes.json", "test_outcome.json",
               "classes.json", "_COMPLETE.json"}


def capture_saved_logits(monkeypatch, module) -> dict:
    """Record the logits of the model at the moment the stage saves it, on a fixed input clip."""
    seen = {}
    original = module.save_model_dir

    def spy(out, model, arch, metrics, config, extra_files=None):
        c = config["clips"]  # [B, C, T, H, W], the clip shape both teacher and student take
        seen["input"] = torch.randn(2, 3, c["frames"], c["height"], c["width"],
                                    generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            seen["logits"] = model.eval()(seen["input"])
        return original(out, model, arch, metrics, config, extra_files)

    monkeypatch.setattr(module, "save_model_dir", spy)
    return seen


def check_model_dir(artifact, cfg, dataset, saved: dict) -> torch.nn.Module:
    """The directory is complete, describes itself, and reloads to exactly the model that was saved."""
    model_dir = Path(artifact.uri)
    assert {p.name for p in model_dir.iterdir()} == MODEL_FILES
    # the config the stage read, section by section (vidopt/stages.py StageReads)
    reads = json.loads((model_dir / "config.json").read_text())
    assert {"run", "clips", "train", "ray"} <= set(reads)
    assert all(section == cfg.model_dump(mode="json")[name] for name, section in reads.items())
    assert json.loads((model_dir / "arch.json").read_text()) == artifact.arch
    assert json.loads((model_dir / "metrics.json").read_text()) == artifact.metrics
    assert artifact.metrics["size_bytes"] == (model_dir / "weights.safetensors").stat().st_size
    reloaded, arch = load_model_dir(model_dir)
    assert arch.num_classes == len(dataset.classes)
    with torch.no_grad():
        assert torch.equal(reloaded(saved["input"]), saved["logits"])
    # The metrics were measured on the saved (best) weights: re-measuring the reloaded model gives the same numbers.
    test_clips = decode_clip_set(split_rows(dataset, "test"), dataset.classes, cfg.clips, None)
    test = evaluate(reloaded, test_clips.batches(cfg.clips.batch_size, shuffle=False))
    assert test["top1_clip"] == pytest.approx(artifact.metrics["test_top1_clip"])
    return reloaded


def test_teacher_trains_logs_saves_and_is_not_retrained(sample_dir, tiny_cfg, monkeypatch):
    cfg = tiny_cfg(f"data.source={sample_dir}", *TEACHER, "tracking.experiment=teacher-test")
    dataset = ingest.run(cfg)
    saved = capture_saved_logits(monkeypatch, common)
    configure_mlflow(cfg)
    with mlflow.start_run() as parent:
        teacher = train_teacher.train_teacher_task.fn(cfg, dataset, parent.info.run_id)

    assert teacher.kind == "teacher" and teacher.data_version == dataset.data_version
    m = teacher.metrics
    assert m["epochs_run"] == 3 and 0 <= m["best_epoch"] < 3
    assert {"val_top1_clip", "val_top1_video", "test_top1_clip", "test_top1_video"} <= set(m)
    assert all(0 <= m[k] <= 1 for k in m if "top1" in k)
    assert m["macs"] > 1e6 and m["params"] > 1e4
    check_model_dir(teacher, cfg, dataset, saved)

    # [MLflow] one nested run: config params, a loss per epoch that fell, final metrics, the model dir.
    client = MlflowClient()
    (stage,) = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert stage.info.run_name == "train_teacher" and stage.data.params["teacher.arch"] == cfg.teacher.arch
    losses = [h.value for h in sorted(client.get_metric_history(stage.info.run_id, "train_teacher.loss"),
                                      key=lambda h: h.step)]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert stage.data.metrics["test_top1_clip"] == pytest.approx(m["test_top1_clip"])
    assert {a.path for a in client.list_artifacts(stage.info.run_id, "model")} == {f"model/{f}" for f in MODEL_FILES}

    # Same inputs again: the finished model is returned as it is; training would fail loudly here.
    monkeypatch.setattr(train_teacher, "run_training", lambda *a, **k: pytest.fail("trained again"))
    again = train_teacher.run(cfg, dataset)
    assert again == teacher


def test_teacher_init_loads_matching_weights_and_replaces_the_classifier(sample_dir, tiny_cfg, tmp_path):
    cfg = tiny_cfg(f"data.source={sample_dir}")
    dataset = ingest.run(cfg)
    # A checkpoint of the same architecture trained for 5 other classes, saved the usual torch way.
    source = build_model(TeacherArch(arch=cfg.teacher.arch, width=0.125, num_classes=5))
    torch.nn.init.normal_(source.stem[0].weight)  # not the default init, so a fresh model could not match by chance
    init = tmp_path / "pretrained.pt"
    torch.save(source.state_dict(), init)

    # epochs=0: no training, so the model dir shows exactly what was loaded.
    cfg = tiny_cfg(f"data.source={sample_dir}", "teacher.width=0.125", "teacher.epochs=0", f"teacher.init={init}")
    teacher = train_teacher.run(cfg, dataset)
    loaded, _ = load_model_dir(teacher.uri)
    expected = dict(source.named_parameters())
    for name, param in loaded.named_parameters():
        if name.startswith("fc."):
            assert param.shape[0] == len(dataset.classes) != expected[name].shape[0]
        else:
            assert torch.equal(param, expected[name]), name
    assert re.match(rf"loaded \d+/\d+ tensors from {re.escape(str(init))}; fresh: fc.bias, fc.weight$",
                    teacher.notes["init"])

    unrelated = tmp_path / "unrelated.pt"
    torch.save({"encoder.conv.weight": torch.zeros(3, 3)}, unrelated)
    with pytest.raises(ValueError, match=re.escape(f"teacher.init {unrelated}: no parameter matches")):
        train_teacher.run(tiny_cfg(f"data.source={sample_dir}", "teacher.width=0.125", f"teacher.init={unrelated}"),
                          dataset)


def test_teacher_without_val_or_test_videos_scores_on_train_and_says_so(sample_dir, tiny_cfg, caplog):
    # Every video in train, so every video is scored each epoch: clips of 4x16x16 keep that quick (and leave the
    # student a 1x1 map, which the config refuses under a larger pooling grid).
    cfg = tiny_cfg(f"data.source={sample_dir}", "data.split_fractions=[1.0, 0.0, 0.0]", "teacher.width=0.125",
                   "teacher.epochs=1", "clips.frames=4", "clips.height=16", "clips.width=16", "distill.pool_grid=1")
    dataset = ingest.run(cfg)
    with caplog.at_level("INFO", logger="vidopt"):
        teacher = train_teacher.run(cfg, dataset)
    assert "the val split is empty; choosing the best epoch on the training clips" in caplog.text
    assert "epoch 1/1 loss" in caplog.text and " train_top1 " in caplog.text and " val_top1 " not in caplog.text
    assert "the test split is empty" in caplog.text
    assert not any(k.startswith(("val_", "test_")) for k in teacher.metrics)
    assert teacher.metrics["epochs_run"] == 1 and teacher.metrics["best_epoch"] == 0


class Crash(Exception):
    pass


def test_teacher_with_frame_differences_and_augmentation_resumes_to_the_same_weights(sample_dir, tiny_cfg,
                                                                                      monkeypatch):
    cfg = tiny_cfg(f"data.source={sample_dir}", "teacher.width=0.125", "teacher.epochs=2", "teacher.patience=10",
                   "teacher.frame_differences=true", "teacher.augment=true")
    dataset = ingest.run(cfg)
    whole = train_teacher.run(cfg, dataset)
    assert whole.arch["frame_differences"] is True
    shutil.rmtree(Path(whole.uri).parent)  # the stage dir: train again from nothing

    real_fit = train_jobs.fit

    def crash_before_the_second_epoch(*args, on_epoch_start, **kwargs):
        def start(epoch: int) -> None:
            if epoch == 1:
                raise Crash("killed after the first epoch's checkpoint")
            on_epoch_start(epoch)
        return real_fit(*args, on_epoch_start=start, **kwargs)

    monkeypatch.setattr(train_jobs, "fit", crash_before_the_second_epoch)
    with pytest.raises(Crash):
        train_teacher.run(cfg, dataset)
    monkeypatch.undo()
    started = []

    def record_epochs(*args, on_epoch_start, **kwargs):
        return real_fit(*args, on_epoch_start=lambda epoch: (started.append(epoch), on_epoch_start(epoch)), **kwargs)

    monkeypatch.setattr(train_jobs, "fit", record_epochs)
    resumed = train_teacher.run(cfg, dataset)
    assert started == [1]  # from the checkpoint, not from scratch
    # The resumed run drew the same clip offsets, order and augmentations for its second epoch.
    assert resumed.weights_sha256 == whole.weights_sha256 and resumed.metrics == whole.metrics


def test_teacher_init_takes_torchvision_weights_by_name_from_torch_hubs_cache(tmp_path, monkeypatch):
    """`torchvision:<weights name>` resolves the name and loads the file torch hub would download. This machine has
    no route to download.pytorch.org, so the file is put where hub keeps it, as a user without that route would."""
    import torchvision

    from vidopt.checkpoint import TORCHVISION_WEIGHTS

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    published = torchvision.models.video.mc3_18()  # the published architecture, 400 classes
    name = "MC3_18_Weights.KINETICS400_V1"
    cached = tmp_path / "hub" / "checkpoints" / Path(torchvision.models.get_weight(name).url).name
    cached.parent.mkdir(parents=True)
    torch.save(published.state_dict(), cached)

    teacher = build_model(TeacherArch(arch="mc3_18", width=1.0, num_classes=8))  # width 1.0: torchvision's own layout
    summary = train_teacher.load_init(teacher, TORCHVISION_WEIGHTS + name)
    assert re.match(rf"loaded \d+/\d+ tensors from torchvision:{name}; fresh: fc.bias, fc.weight$", summary)
    assert torch.equal(teacher.state_dict()["layer4.1.conv2.0.weight"],
                       published.state_dict()["layer4.1.conv2.0.weight"])

    with pytest.raises(ValueError, match="torchvision:MC3_18_Weights.NOPE: not a torchvision weights name"):
        train_teacher.load_init(teacher, TORCHVISION_WEIGHTS + "MC3_18_Weights.NOPE")
    # Not cached, and no route to the server (a proxy on a closed local port refuses at once, network or not): the
    # error says where to put the file.
    cached.unlink()
    for variable in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(RuntimeError, match=re.escape(str(cached.parent))):
        train_teacher.load_init(teacher, TORCHVISION_WEIGHTS + name)


def test_an_rgb_checkpoint_starts_a_frame_difference_teacher_as_exactly_itself(tmp_path):
    """teacher.frame_differences makes the stem read 6 planes: the checkpoint's RGB stem goes on the frames, zeros on
    the differences, so before training the teacher computes what the published model does."""
    torch.manual_seed(0)
    rgb = build_model(TeacherArch(arch="r3d_18", width=0.125, num_classes=4)).eval()
    init = tmp_path / "rgb.pt"
    torch.save(rgb.state_dict(), init)
    teacher = build_model(TeacherArch(arch="r3d_18", width=0.125, num_classes=4, frame_differences=True)).eval()
    summary = train_teacher.load_init(teacher, str(init))
    assert "RGB stem adapted to frame differences" in summary and summary.startswith("loaded ")
    x = torch.randn(2, 3, 4, 16, 16)
    with torch.no_grad():
        assert torch.allclose(teacher(x), rgb(x), atol=1e-5)
    wider = build_model(TeacherArch(arch="r3d_18", width=0.25, num_classes=4))
    with pytest.raises(ValueError, match="other shapes .* check teacher.arch and teacher.width"):
        train_teacher.load_init(wider, str(init))
