"""Pruning stage on a real ingested tiny dataset: structured pruning meets its MAC target and rebuilds from arch.json;
L1 unstructured pruning reaches its sparsity and changes no MACs."""
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tasks import ingest, prune
from vidopt.artifacts import ModelArtifact
from vidopt.checkpoint import load_checkpoint, load_model_dir, save_model_dir
from vidopt.config import load_config
from vidopt.data import split_for_hash
from vidopt.distillation import decode_clip_set
from vidopt.metrics import count_macs
from vidopt.models import Student, StudentArch, TeacherArch, build_model
from vidopt.stages import split_rows
from vidopt.storage import read_jsonl, sha256_file, write_jsonl
from vidopt.store import store_for
from vidopt.training import FitSpec, evaluate, fit

STUDENT_EPOCHS = 4  # enough for the student to fit its training clips, so pruning has accuracy to lose


def _model_artifact(out: Path, model: nn.Module, arch, kind: str, data_version: str) -> ModelArtifact:
    """A model folder published where it is (a local store reads this machine's paths wherever they are)."""
    sha = save_model_dir(out, model, arch, {}, {})
    store_for(str(out.parent)).put_dir(out, str(out))
    return ModelArtifact(uri=str(out), kind=kind, arch=arch.model_dump(), weights_sha256=sha, metrics={},
                         data_version=data_version)


@pytest.fixture(scope="module")
def upstream(sample_dir, tmp_path_factory):
    """A real dataset, a student trained a few epochs with `fit`, and a random-init r3d teacher.

    The tiny dataset is too small for a student to generalise (val top-1 stays at chance), so the val split here is
    the training videos again: val top-1 then measures what fine-tuning is for, getting back the function that pruning
    damaged. The test split stays the real held-out one."""
    root = tmp_path_factory.mktemp("prune")
    # Widths above prune.channel_multiple, so that rounding to it is exercised (the tiny profile's own are narrower).
    cfg = load_config("tiny", [f"run.project_dir={root / 'project'}", f"data.source={sample_dir}",
                               "distill.conv_widths=[16, 32, 64, 128]", "distill.temporal_widths=[128]",
                               "prune.target_macs_ratio=0.45"])
    dataset = ingest.run(cfg)
    # each video split by its own hash (split_for_hash), as this fixture's numbers were chosen on: a split that leaves
    # some class out of test, which ingestion itself refuses
    videos = [{**r, "split": split_for_hash(r["sha256"], cfg.data.split_fractions)}
              for r in read_jsonl(Path(dataset.manifest_uri))]
    rows = [r for r in videos if r["split"] == "train"]
    manifest = root / "manifest.jsonl"
    write_jsonl(manifest, rows + [{**r, "split": "val"} for r in rows] + [r for r in videos if r["split"] == "test"])
    dataset = dataset.model_copy(update={"manifest_uri": str(manifest), "manifest_sha256": sha256_file(manifest)})

    torch.manual_seed(0)
    classes = len(dataset.classes)
    arch = StudentArch(frames=cfg.clips.frames, height=cfg.clips.height, width=cfg.clips.width,
                       conv_widths=cfg.distill.conv_widths, conv_strides=cfg.distill.conv_strides,
                       temporal_widths=cfg.distill.temporal_widths, pool_grid=cfg.distill.pool_grid,
                       frame_differences=False, num_classes=classes)
    # RGB only: consecutive tiny clips (stride 1, 32x32) differ mostly by pixel noise, and with difference channels
    # the student fit 17% of its training clips in 4 epochs instead of 37% (chance: 12.5%).
    student = build_model(arch)
    train = decode_clip_set(rows, dataset.classes, cfg.clips, cfg.distill.cached_clips_per_video)
    batches = list(train.batches(cfg.clips.batch_size, shuffle=True, seed=0))
    fit(student, lambda m, b: F.cross_entropy(m(b[0]), b[1]), batches, lambda m: 0.0,
        FitSpec(epochs=STUDENT_EPOCHS, lr=3e-3), root / "student.pt")
    teacher_arch = TeacherArch(arch="r3d_18", width=0.125, num_classes=classes)
    return {"dataset": dataset,
            "student": _model_artifact(root / "student", student, arch, "student", dataset.data_version),
            "teacher": _model_artifact(root / "teacher", build_model(teacher_arch), teacher_arch, "teacher",
                                       dataset.data_version)}


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_trace_keeps_encoder_to_head_coupling_right():
    """A dead channel of the last encoder conv (its output is 0 on every input) pruned away must change no logit; with
    Student.forward traced as is, Torch-Pruning maps that channel to the wrong head inputs."""
    torch.manual_seed(0)
    arch = StudentArch(frames=8, height=32, width=32, num_classes=5)
    model = Student(arch).eval()
    last_conv, last_bn = model.encoder.convs[-1][0], model.encoder.convs[-1][1]
    dead, grid = 5, arch.pool_grid**2
    with torch.no_grad():
        last_conv.weight[dead] = 0
        last_bn.bias[dead] = 0                                   # BN(0) = 0 -> ReLU -> 0 for every frame
        model.head.convs[0].weight[:, dead * grid:(dead + 1) * grid] = 0  # so the group's magnitude is the smallest
    x = torch.randn(2, *prune.clip_shape(arch))
    before = _logits(model, x)
    plan = arch.model_copy(update={"conv_widths": arch.conv_widths[:-1] + [arch.conv_widths[-1] - 1]})
    pruned_arch = prune.prune_to_widths(model, arch, plan)
    assert pruned_arch.conv_widths == plan.conv_widths
    assert model.head.convs[0].in_channels == (arch.conv_widths[-1] - 1) * grid
    assert torch.allclose(_logits(model, x), before, atol=1e-5)


def test_unreachable_mac_target_names_the_setting():
    arch = StudentArch(frames=8, height=32, width=32, num_classes=5)
    with pytest.raises(prune.PruneError, match="prune.target_macs_ratio"):
        prune.plan_widths(arch, 1e-4, multiple=1)  # not even one channel per layer fits


def test_step_plans_cut_every_layer_by_the_same_share_each_round():
    arch = StudentArch(frames=8, height=64, width=64, num_classes=8)   # [16, 32, 64, 128] / [128]
    plans = prune.step_plans(arch, 0.40, steps=4, multiple=16)
    assert plans[-1] == prune.plan_widths(arch, 0.40, multiple=16) and len(plans) == 4
    widths = [p.conv_widths + p.temporal_widths for p in plans]
    # to [16, 16, 16, 48] / [48]: a quarter of each layer's cut per round, in whole channels
    assert widths == [[16, 28, 52, 108, 108], [16, 24, 40, 88, 88], [16, 20, 28, 68, 68], [16, 16, 16, 48, 48]]
    base = count_macs(build_model(arch), prune.clip_shape(arch))
    macs = [count_macs(build_model(p), prune.clip_shape(arch)) for p in plans]
    assert macs == sorted(macs, reverse=True) and len(set(macs)) == 4 and macs[0] > 0.6 * base
    assert macs[-1] <= 0.40 * base
    assert prune.step_plans(arch, 0.40, steps=1, multiple=16) == plans[-1:]


def test_structured_prune_meets_mac_target_and_rebuilds(upstream, tmp_path):
    student_model, arch = load_model_dir(upstream["student"].uri)
    target = 0.45
    pruned_arch = prune.prune_to_widths(student_model, arch, prune.plan_widths(arch, target, multiple=16))
    shape = prune.clip_shape(arch)
    assert count_macs(student_model, shape) <= target * count_macs(build_model(arch), shape)
    assert all(a <= b for a, b in zip(pruned_arch.conv_widths, arch.conv_widths)) and pruned_arch != arch
    assert all(w % 16 == 0 for w in pruned_arch.conv_widths + pruned_arch.temporal_widths)
    assert pruned_arch.conv_widths[0] == arch.conv_widths[0] == 16  # no narrower than the multiple: the stem stays
    # Every BN follows its conv, every conv's input is the previous output, the head reads width x grid^2 features.
    layers = [m for m in student_model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.BatchNorm1d,
                                                                   nn.BatchNorm2d, nn.Linear))]
    convs = [m for m in layers if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    for conv, bn in zip(convs, [m for m in layers if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))], strict=True):
        assert bn.num_features == conv.out_channels
    encoder = len(arch.conv_widths)
    assert [c.in_channels for c in convs[1:encoder]] == [c.out_channels for c in convs[:encoder - 1]]
    assert convs[encoder].in_channels == convs[encoder - 1].out_channels * arch.pool_grid**2
    assert student_model.head.fc.out_features == arch.num_classes  # classifier outputs untouched
    save_model_dir(tmp_path / "pruned", student_model, pruned_arch, {}, {})
    rebuilt, rebuilt_arch = load_model_dir(tmp_path / "pruned")
    x = torch.randn(2, *shape)
    assert rebuilt_arch == pruned_arch
    assert (_logits(rebuilt, x) - _logits(student_model, x)).abs().max() < 1e-5


def test_structured_stage_fine_tunes_back_what_pruning_lost(upstream, tiny_cfg):
    cfg = tiny_cfg("prune.target_macs_ratio=0.45", "prune.finetune_epochs=3")
    # prune.distill_from=student (the default): the unpruned student's logits on the training clips are what the
    # fine-tuning matches, not the (here untrained) teacher's.
    assert cfg.prune.distill_from == "student"
    pruned = prune.run(cfg, upstream["dataset"], upstream["student"], teacher=upstream["teacher"])
    assert pruned.notes["distilled_from"] == "student"

    m = pruned.metrics
    assert pruned.kind == "pruned" and m["macs"] <= 0.45 * m["macs_before"] and m["macs_ratio"] < 0.45 + 1e-9
    assert m["params"] < m["params_before"] and m["epochs_run"] == 3
    unpruned_val = m["val_top1_clip"] - m["val_top1_clip_change"]
    assert m["val_top1_clip_before_finetune"] < unpruned_val              # pruning cost something
    assert m["val_top1_clip"] >= m["val_top1_clip_before_finetune"]      # fine-tuning won it back
    # The kept epoch is the one closest to the unpruned student on the val clips (lowest distillation loss), which
    # fine-tuning brought below where pruning left it.
    history = load_checkpoint(Path(pruned.uri).parent / f"{prune.CHECKPOINT}.pt")["history"]
    val_losses = [h["score"] for h in history]
    assert m["best_epoch"] == min(range(len(val_losses)), key=lambda e: (val_losses[e], -e))
    assert m["val_kd_loss"] == min(val_losses) < m["val_kd_loss_before_finetune"]
    assert f"kept epoch {int(m['best_epoch']) + 1} (lowest val distillation loss)" in pruned.notes["finetune"]
    for key in ("val_top1_video", "test_top1_clip", "test_top1_video", "test_top1_clip_change", "size_bytes"):
        assert key in m
    widths_before, widths_after = (json.loads(pruned.notes[k]) for k in ("widths_before", "widths_after"))
    assert widths_after["conv_widths"] == pruned.arch["conv_widths"] != widths_before["conv_widths"]

    # The saved directory alone rebuilds the model the stage measured.
    model, _ = load_model_dir(pruned.uri)
    assert m["rebuild_max_abs_diff"] < 1e-5
    val = decode_clip_set(split_rows(upstream["dataset"], "val"), upstream["dataset"].classes, cfg.clips, None)
    assert evaluate(model, val.batches(cfg.clips.batch_size, shuffle=False))["top1_clip"] == m["val_top1_clip"]
    # Done once: the same inputs return the stored result.
    assert prune.run(cfg, upstream["dataset"], upstream["student"], upstream["teacher"]) == pruned


def test_l1_unstructured_reaches_sparsity_and_changes_no_macs(upstream, tiny_cfg):
    cfg = tiny_cfg("prune.method=l1_unstructured", "prune.sparsity=0.6", "prune.finetune_epochs=1")
    pruned = prune.run(cfg, upstream["dataset"], upstream["student"], upstream["teacher"])

    m = pruned.metrics
    assert abs(m["sparsity"] - 0.6) < 0.01  # measured after fine-tuning: the masked weights did not grow back
    assert m["macs"] == m["macs_before"] and m["macs_ratio"] == 1.0 and m["params"] == m["params_before"]
    assert pruned.notes["speed"] == prune.L1_NOTE
    assert pruned.arch == upstream["student"].arch
    model, _ = load_model_dir(pruned.uri)
    assert abs(prune.weight_sparsity(model) - m["sparsity"]) < 1e-9
    assert not any("_orig" in k or "_mask" in k for k in model.state_dict())  # made permanent


def test_iterative_rounds_reach_the_target_and_a_rerun_replays_finished_rounds(upstream, tiny_cfg):
    cfg = tiny_cfg("prune.target_macs_ratio=0.45", "prune.steps=2", "prune.step_epochs=1", "prune.finetune_epochs=1")
    pruned = prune.run(cfg, upstream["dataset"], upstream["student"], upstream["teacher"])
    m, rounds = pruned.metrics, json.loads(pruned.notes["rounds"])
    assert m["macs"] <= 0.45 * m["macs_before"] and m["epochs_run"] == 1
    assert len(rounds) == 1  # the round before the last, with its own fine-tune
    first, final = rounds[0]["widths"], pruned.arch["conv_widths"] + pruned.arch["temporal_widths"]
    student_widths = upstream["student"].arch["conv_widths"] + upstream["student"].arch["temporal_widths"]
    assert all(s >= f >= t for s, f, t in zip(student_widths, first, final)) and first != final

    # A crash after round 1: the finished stage and the last fine-tune are gone, round 1's result is not. The rerun
    # re-prunes, reloads round 1's fine-tuned weights instead of training them again, and ends with the very same
    # model.
    work = Path(pruned.uri).parent
    round1 = work / f"round1_{prune.CHECKPOINT}.pt"
    stamp = round1.stat().st_mtime_ns
    shutil.rmtree(pruned.uri)
    for last in work.glob(f"{prune.CHECKPOINT}.*"):   # its checkpoint, weights and result
        last.unlink()
    again = prune.run(cfg, upstream["dataset"], upstream["student"], upstream["teacher"])
    assert round1.stat().st_mtime_ns == stamp
    assert again.weights_sha256 == pruned.weights_sha256
