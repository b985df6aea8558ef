"""Quantization stage on the tiny profile: a briefly trained student -> fp32 + int8 ONNX, by PTQ and by forced QAT."""
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from tasks import ingest, quantize
from tasks.common import clip_set, eval_clip_set, load_clip_set
from vidopt.artifacts import ModelArtifact
from vidopt.checkpoint import load_model_dir, save_model_dir
from vidopt.config import load_config
from vidopt.models import StudentArch, build_model
from vidopt.onnx_utils import (FORMS_INDEX, INT8_FORMS_DIR, int8_form_files, op_counts, ort_predict, ort_session,
                               takes_pixels)
from vidopt.qat import prepare_qat, student_state_from_qat
from vidopt.stages import open_store
from vidopt.stats import unpack_correct
from vidopt.storage import sha256_file
from vidopt.training import FitSpec, evaluate, fit


def clip_sets(cfg, dataset, splits: tuple[str, ...]) -> list:
    """The stage's clip sets of these splits (the store's: training clips as distillation fixes them, eval clips as
    evaluation samples them)."""
    reads, store = quantize.Reads.of(cfg), open_store(cfg.run)
    return [load_clip_set(store, clip_set(reads, dataset, split, cfg.distill.cached_clips_per_video) if split == "train"
                          else eval_clip_set(reads, dataset, split)) for split in splits]


def _config(project: Path, source: Path, *overrides: str):
    return load_config("tiny", [f"run.project_dir={project}", f"data.source={source}", "quantize.threads=[1]",
                                "quantize.calibration_clips=32", *overrides])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sample_dir):
    """Dataset, and a student trained a few epochs on it (decisive logits, so argmax agreement means something).
    QAT distils the fp32 model into its fake-quantized self, so no teacher is needed."""
    root = tmp_path_factory.mktemp("quantize")
    cfg = _config(root / "project", sample_dir)
    dataset = ingest.run(cfg)
    train, val = clip_sets(cfg, dataset, ("train", "val"))
    torch.manual_seed(0)
    arch = StudentArch(frames=cfg.clips.frames, height=cfg.clips.height, width=cfg.clips.width,
                       conv_widths=[16, 32, 32], conv_strides=[2, 2, 2], temporal_widths=[32],
                       num_classes=len(dataset.classes))
    model = build_model(arch)
    fit(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), list(train.batches(8, shuffle=True)),
        lambda m: evaluate(m, val.batches(8, shuffle=False))["top1_clip"], FitSpec(epochs=3, lr=3e-3),
        root / "student_last.pt")
    sha = save_model_dir(root / "student", model, arch, {}, cfg.model_dump(mode="json"))
    open_store(cfg.run).put_dir(root / "student", str(root / "student"))
    student = ModelArtifact(uri=str(root / "student"), kind="student", arch=arch.model_dump(), weights_sha256=sha,
                            metrics={}, data_version=dataset.data_version)
    return {"root": root, "source": sample_dir, "dataset": dataset, "student": student}


def _test_clip_logits(model_dir: Path, cfg, dataset, name: str) -> tuple[np.ndarray, np.ndarray]:
    (test,) = clip_sets(cfg, dataset, ("test",))
    clips = [test.clips[i:i + 8] for i in range(0, len(test.labels), 8)]   # as stored: ort_predict adapts them
    return ort_predict(ort_session(model_dir / name), clips), test.labels.numpy()


def test_ptq_writes_a_verified_int8_model(trained):
    cfg = _config(trained["root"] / "project", trained["source"], "quantize.max_top1_drop=1.0")  # never QAT here
    art = quantize.run(cfg, trained["dataset"], trained["student"])
    out, m = Path(art.uri), art.metrics

    assert art.kind == "int8" and art.notes["quantization"] == "ptq"
    assert art.notes["int8_input"].startswith("[B, 3, T, H, W] uint8 RGB pixels")
    for name in ("model_fp32.onnx", "model_int8.onnx", "arch.json", "metrics.json", "config.json"):
        assert (out / name).is_file(), name
    assert art.weights_sha256 == sha256_file(out / "model_int8.onnx")
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(m)
    ops = op_counts(out / "model_int8.onnx")
    assert ops["QuantizeLinear"] >= 4 and ops["DequantizeLinear"] >= 4 and "BatchNormalization" not in ops
    # int8 reads the decoded uint8 pixels; the fp32 file normalised floats, as PyTorch does
    assert takes_pixels(onnx.load(str(out / "model_int8.onnx")))
    assert not takes_pixels(onnx.load(str(out / "model_fp32.onnx")))
    # Every int8 form travels with the model dir for the CPU target to rank; the shipped file is the chosen one.
    forms = int8_form_files(out / INT8_FORMS_DIR)
    index = json.loads((out / INT8_FORMS_DIR / FORMS_INDEX).read_text())
    chosen = index["chosen"]
    assert len(forms) == 5 and sha256_file(forms[chosen]) == art.weights_sha256   # G = 1, 4 x 2 poolings; grouped
    assert sum("grouped_body=True" in name for name in forms) == 1
    # each form scored on the test clips against the student; the kept one within the registry's budget if any is
    agreement = {form["name"]: form["argmax_agreement"] for form in index["forms"]}
    budget = cfg.budgets.min_argmax_agreement
    within = [name for name, value in agreement.items() if value >= budget]
    assert chosen in within if within else agreement[chosen] == max(agreement.values())

    assert m["fp32_ort.max_abs_diff"] <= 1e-4
    assert m["ptq.test_argmax_agreement"] >= 0.9
    assert m["size_int8_mb"] < m["size_fp32_mb"]
    for model in ("fp32", "int8"):
        for batch in (1, 8):
            assert m[f"latency.{model}.b{batch}.t1.p95_ms"] >= m[f"latency.{model}.b{batch}.t1.p50_ms"] > 0
    assert m["speedup.b1.t1"] == pytest.approx(m["latency.fp32.b1.t1.p50_ms"] / m["latency.int8.b1.t1.p50_ms"])
    assert m["speedup_quietest.b1.t1"] == pytest.approx(m["latency.fp32.b1.t1.best_p50_ms"] /
                                                       m["latency.int8.b1.t1.best_p50_ms"])

    # The shipped file is the one that was scored: recompute its test top-1 from disk.
    logits, labels = _test_clip_logits(out, cfg, trained["dataset"], "model_int8.onnx")
    assert float((logits.argmax(1) == labels).mean()) == pytest.approx(m["test_top1_clip"])
    # Same inputs and config: the finished stage is returned, not redone.
    assert quantize.run(cfg, trained["dataset"], trained["student"]) == art


def test_qat_weights_map_back_to_the_plain_student_exactly(trained):
    student, arch = load_model_dir(trained["student"].uri)
    qat = prepare_qat(student, arch)
    fake_quant = sum("fake_quant" in k or "activation_post_process" in k for k in qat.state_dict())
    assert fake_quant > 0
    state = student_state_from_qat(qat)
    rebuilt = build_model(arch)
    rebuilt.load_state_dict(state)  # strict: no key missing, none left over
    for key, value in student.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key


def test_ptq_falls_short_on_top1_lost_or_on_the_registry_agreement_gate():
    cfg = load_config("tiny", ["quantize.max_top1_drop=0.01", "budgets.min_argmax_agreement=0.99"])
    ok = {"fp32.test_top1_clip": 0.934, "ptq.test_top1_clip": 0.939, "ptq.test_argmax_agreement": 1.0}
    assert quantize.ptq_shortfalls(cfg, ok) == []
    # 195 of 197 clips agree: more accurate than fp32, but the registry's gate would refuse it
    disagrees = {**ok, "ptq.test_argmax_agreement": 195 / 197}
    (reason,) = quantize.ptq_shortfalls(cfg, disagrees)
    assert "argmax agreement 0.9898 < budgets.min_argmax_agreement 0.99" in reason
    loses = {**disagrees, "ptq.test_top1_clip": 0.914}
    assert [r.split()[1] for r in quantize.ptq_shortfalls(cfg, loses)] == ["lost", "argmax"]


def test_qat_runs_when_ptq_misses_the_budget(trained):
    # 2 windows per test video (26 clips, not 13; 4 asked, 2 fit in 16 frames): the tiny student's logits are close
    # together, and on 13 clips the int8 rounding of one clip moved argmax agreement from 0.92 to 0.85 between two
    # int8 forms of equal error.
    cfg = _config(trained["root"] / "project", trained["source"], "quantize.qat_epochs=1", "quantize.qat_lr=3e-4",
                  "clips.eval_clips_per_video=4")
    # A budget below zero forces QAT whatever PTQ scores (the config refuses it; tests bypass validation).
    cfg = cfg.model_copy(update={"quantize": cfg.quantize.model_copy(update={"max_top1_drop": -1.0})})
    art = quantize.run(cfg, trained["dataset"], trained["student"])
    out, m = Path(art.uri), art.metrics

    assert art.notes["quantization"] == "qat"
    assert {"ptq_test_top1", "qat_test_top1", "fp32_test_top1", "reason"} <= set(art.notes)
    assert m["test_top1_clip"] == m["qat.test_top1_clip"] and "ptq.test_top1_clip" in m
    assert m["qat.test_argmax_agreement"] >= 0.9 and m["fp32_ort.max_abs_diff"] <= 1e-4
    # every statistic counts videos, not windows: one outcome per test video, its 4 windows' logits averaged
    test_videos = trained["dataset"].class_counts
    n_test = sum(c["test"] for c in test_videos.values())
    assert len(unpack_correct(art.test_correct)) == n_test == int(np.sum(art.test_confusion))
    assert abs(unpack_correct(art.test_correct).mean() - m["test_top1_video"]) < 1e-9
    # The soft targets were the fp32 student's own logits on the training clips (no teacher is an input)
    soft = torch.load(Path(art.uri).parent / "fp32_logits.pt", weights_only=True)
    student, _ = load_model_dir(trained["student"].uri)
    (train,) = clip_sets(cfg, trained["dataset"], ("train",))
    with torch.no_grad():
        assert torch.allclose(soft, torch.cat([student(x) for x, _, _ in train.batches(8, shuffle=False)]), atol=1e-5)
    # The model dir holds the fine-tuned weights, and model_fp32.onnx is exactly their export.
    assert sha256_file(out / "weights.safetensors") != trained["student"].weights_sha256
    tuned, _ = load_model_dir(out)
    (test,) = clip_sets(cfg, trained["dataset"], ("test",))
    x = next(test.batches(8, shuffle=False))[0]
    with torch.no_grad():
        expected = tuned(x).numpy()
    assert np.abs(ort_predict(ort_session(out / "model_fp32.onnx"), [x]) - expected).max() <= 1e-4
    assert op_counts(out / "model_int8.onnx")["QuantizeLinear"] >= 4
