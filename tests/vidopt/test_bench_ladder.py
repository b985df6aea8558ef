"""The speed/size ladder: MAC counts against torchvision's published numbers, and the report on small models."""
import json
from pathlib import Path

import onnx
import pytest
import torch

from vidopt.bench import ladder
from vidopt.checkpoint import save_model_dir
from vidopt.config import DistillConfig
from vidopt.metrics import count_macs
from vidopt.models import StudentArch, TeacherArch, build_model
from vidopt.onnx_utils import quantize_model_int8, takes_pixels


@pytest.mark.parametrize("arch, published_gflops", [("r3d_18", 40.70), ("r2plus1d_18", 40.52)])
def test_count_macs_matches_torchvision_published_gflops(arch, published_gflops):
    model = build_model(TeacherArch(arch=arch, width=1.0, num_classes=400))
    assert count_macs(model, (3, 16, 112, 112)) / 1e9 == pytest.approx(published_gflops, rel=0.02)


SHAPE = (3, 4, 32, 32)
STUDENT = StudentArch(frames=4, height=32, width=32, conv_widths=[16, 32, 32], conv_strides=[2, 2, 2],
                      temporal_widths=[32], num_classes=5)
PRUNED = STUDENT.model_copy(update={"conv_widths": [8, 16, 16], "temporal_widths": [16]})


def _fake_project(root: Path) -> Path:
    """A finished run's layout, <project>/stages/<stage>/<key>/model, with small random models and known metrics."""
    config = {"clips": {"frames": SHAPE[1], "height": SHAPE[2], "width": SHAPE[3]}, "run": {"seed": 0}}
    torch.manual_seed(0)
    # The "teacher" here is a wide student: the ladder reads any model dir the same way, and the (2+1)D teacher's
    # export (the slow part of this test) is already covered by the full-size part.
    wide = STUDENT.model_copy(update={"conv_widths": [64, 64, 64], "temporal_widths": [64]})
    models = {"train_teacher": wide, "distill": STUDENT, "prune": PRUNED, "quantize": PRUNED}
    for i, (stage, arch) in enumerate(models.items()):
        out = root / "stages" / stage / "key" / "model"
        model = build_model(arch).eval()
        extra = {}
        if stage == "quantize":
            c, t, h, w = SHAPE   # calibration clips as the pipeline stores them: uint8 [B, T, H, W, C]
            stored = torch.randint(0, 256, (4, t, h, w, c), dtype=torch.uint8)
            extra["model_int8.onnx"] = quantize_model_int8(model, SHAPE, root / "pruned_int8.onnx", [stored])
        save_model_dir(out, model, arch, {"test_top1_clip": 0.5 + i / 10, "test_top1_video": 0.6}, config, extra)
    return root


def test_ladder_reports_full_size_and_trained_rows(tmp_path):
    project = _fake_project(tmp_path / "project")
    (tmp_path / "arch.json").write_text(STUDENT.model_dump_json())
    out = tmp_path / "report"
    report = ladder.main(["--arch", str(tmp_path / "arch.json"), "--teacher-width", "0.125",
                          "--shape", *map(str, SHAPE[1:]), "--project-dir", str(project), "--out", str(out),
                          "--threads", "1", "--rounds", "1", "--iters", "2"])

    assert json.loads((out / "ladder.json").read_text()) == report
    table = (out / "ladder.md").read_text()
    full = report["full_size"]
    assert "random weights" in full["note"] and "random weights" in table
    assert set(full["rows"]) == {"teacher fp32", "student fp32", "student int8"}
    assert full["input"] == list(SHAPE) and full["teacher"]["arch"] == "r2plus1d_18"
    # The given arch's widths, with Kinetics-400's classes like the teacher it is compared with.
    assert full["student"]["conv_widths"] == STUDENT.conv_widths and full["student"]["num_classes"] == 400
    rows = full["rows"]
    assert rows["student int8"]["size_mb"] < rows["student fp32"]["size_mb"] < rows["teacher fp32"]["size_mb"]
    assert rows["teacher fp32"]["gmacs"] > 3 * rows["student fp32"]["gmacs"]
    assert full["speedup"] == pytest.approx(rows["teacher fp32"]["p50_ms"] / rows["student int8"]["p50_ms"])
    assert full["size_ratio"] == pytest.approx(rows["teacher fp32"]["size_mb"] / rows["student int8"]["size_mb"])
    assert full["meets_bars"]["size_ratio"] == (full["size_ratio"] >= 100)

    trained = report["trained"]
    assert list(trained["rows"]) == ["teacher fp32", "student fp32", "pruned fp32", "pruned fp32 uint8-in",
                                     "pruned int8"]
    assert trained["missing"] == [] and trained["input"] == list(SHAPE)
    t = trained["rows"]
    assert [r["test_top1_clip"] for r in t.values()] == pytest.approx([0.5, 0.6, 0.7, 0.7, 0.8])
    assert t["pruned fp32 uint8-in"]["model_dir"] == t["pruned fp32"]["model_dir"]  # the same model, another input
    assert t["pruned int8"]["size_mb"] < t["pruned fp32"]["size_mb"] < t["student fp32"]["size_mb"]
    assert t["pruned fp32"]["gmacs"] < t["student fp32"]["gmacs"]
    assert t["pruned int8"]["params"] == t["pruned fp32"]["params"]
    for r in t.values():
        assert 0 < r["p50_ms.t1"] <= r["p95_ms.t1"] and r["b8_clips_s.t1"] > 0
        assert r["vs_teacher"]["speedup"] == pytest.approx(t["teacher fp32"]["p50_ms.t1"] / r["p50_ms.t1"])
    assert t["teacher fp32"]["vs_teacher"] == {"speedup": 1.0, "size_ratio": 1.0}
    # Every bar is computed from the rows and marked as they say; each appears in the table.
    bars = {(b["rung"], b["baseline"], b["measure"]): b for b in trained["bars"]}
    assert len(bars) == len(ladder.TRAINED_BARS)
    prune_speed = bars["pruned fp32", "student fp32", "speedup"]
    assert prune_speed["value"] == pytest.approx(t["student fp32"]["p50_ms.t1"] / t["pruned fp32"]["p50_ms.t1"])
    assert prune_speed["met"] == (prune_speed["value"] >= 1.7)
    assert prune_speed["quietest"] == pytest.approx(t["student fp32"]["best_p50_ms.t1"] /
                                                    t["pruned fp32"]["best_p50_ms.t1"])
    assert all(0 < r["best_p50_ms.t1"] <= r["p50_ms.t1"] for r in t.values())
    assert table.count("between each model's quietest rounds") == sum(b["measure"] == "speedup" for b in bars.values())
    loss = bars["pruned int8", "teacher fp32", "top1_loss_points"]
    assert loss["value"] == pytest.approx(-30.0) and loss["met"]  # 0.5 -> 0.8: no loss at all
    # int8 against fp32 on the same uint8 input: reported, not judged.
    same_input = bars["pruned int8", "pruned fp32 uint8-in", "speedup"]
    assert same_input["value"] == pytest.approx(t["pruned fp32 uint8-in"]["p50_ms.t1"] / t["pruned int8"]["p50_ms.t1"])
    assert same_input["bar"] is None and same_input["met"] is None
    assert "pruned int8 vs pruned fp32 uint8-in: " in table and "(the same uint8 input; no bar)" in table
    judged = [b for b in bars.values() if b["bar"] is not None]
    assert "pruned fp32 vs student fp32: " in table and table.count(" met)") == len(judged)
    assert (out / "ladder.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the same ladder, plotted
    for name in t:
        assert f"| {name} |" in table


def test_same_input_row_is_the_pruned_model_reading_uint8_pixels(tmp_path):
    project = _fake_project(tmp_path / "project")
    ladder.trained_ladder(project, tmp_path, threads=[1], rounds=1, iters=2)
    assert takes_pixels(onnx.load(tmp_path / "pruned_fp32_uint8-in.onnx"))
    assert not takes_pixels(onnx.load(tmp_path / "pruned_fp32.onnx"))


def test_ladder_without_models_says_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match="run the pipeline first"):
        ladder.trained_ladder(tmp_path, tmp_path, threads=[1])


def test_rows_come_from_the_run_of_the_int8_models_seed(tmp_path):
    project = _fake_project(tmp_path / "project")
    config = {"clips": {"frames": SHAPE[1], "height": SHAPE[2], "width": SHAPE[3]}, "run": {"seed": 2}}
    other = project / "stages" / "train_teacher" / "seed2" / "model"   # a later run of another seed, teacher only
    save_model_dir(other, build_model(STUDENT).eval(), STUDENT, {"test_top1_clip": 0.9}, config)
    seed0 = project / "stages" / "train_teacher" / "key" / "model"
    assert ladder.find_model_dir(project, "train_teacher") == other
    assert ladder.find_model_dir(project, "train_teacher", seed=0) == seed0
    rows = ladder.trained_ladder(project, tmp_path, threads=[1], rounds=1, iters=2)["rows"]
    assert rows["teacher fp32"]["model_dir"] == str(seed0)


def test_full_size_student_is_the_projects_final_one_unless_an_arch_is_given(tmp_path):
    project = _fake_project(tmp_path / "project")
    assert ladder.full_size_student(None, project).conv_widths == PRUNED.conv_widths  # the quantize stage's model
    (tmp_path / "arch.json").write_text(STUDENT.model_dump_json())
    assert ladder.full_size_student(tmp_path / "arch.json", project).conv_widths == STUDENT.conv_widths
    default = ladder.full_size_student(None, None)  # the pipeline's student at full size
    assert default == StudentArch(**DistillConfig().architecture()) and (default.frames, default.height) == (16, 112)
