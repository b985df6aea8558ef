"""A stage's cache key is the hash of exactly what it reads: its Reads record (runtime-only fields left out) and its
inputs. Reading a section it did not declare fails, so no field it depends on can be missing from its key."""
import pytest

from tasks import distill, export, prune, quantize, register, report, train_teacher
from vidopt.config import load_config
from vidopt.dag import STAGES, through


def test_every_declared_field_moves_the_key_and_runtime_ones_do_not():
    cfg = load_config("tiny")
    reads = prune.Reads.of(cfg)
    key = reads.key(["in"])
    assert key == prune.Reads.of(load_config("tiny")).key(["in"]) != reads.key(["other input"])
    for override in ("prune.finetune_epochs=3", "distill.temperature=2.0", "clips.frames=4", "run.seed=1"):
        assert prune.Reads.of(load_config("tiny", [override])).key(["in"]) != key, override
    for override in ("clips.loader_workers=5", "train.workers=4", "ray.job_timeout_s=5", "run.project_dir=/elsewhere",
                     "run.artifact_root=s3://bucket/p", "quantize.qat_epochs=9"):   # how/where, or not read at all
        assert prune.Reads.of(load_config("tiny", [override])).key(["in"]) == key, override


def test_a_stage_sees_only_the_sections_it_declares():
    reads = train_teacher.Reads.of(load_config("tiny"))
    assert reads.teacher.arch == "r3d_18" and reads.clips.frames == 8
    with pytest.raises(AttributeError):
        reads.distill   # noqa: B018  (train_teacher does not read the student's section)
    assert set(quantize.Reads.model_fields) >= {"quantize", "distill", "budgets", "clips"}
    assert set(export.Reads.model_fields) >= {"export", "budgets"} and "budgets" in register.Reads.model_fields
    assert {"budgets", "report", "export"} <= set(report.Reads.model_fields)
    assert "teacher" not in distill.Reads.model_fields   # the teacher reaches distillation as an artifact hash


def test_the_stage_order_is_written_once_and_every_input_comes_from_an_earlier_stage():
    seen = set()
    for stage in STAGES:
        assert set(stage.needs) <= seen, stage
        seen.add(stage.gives)
    assert [s.name for s in through("distill")] == ["ingest", "train_teacher", "distill"]
