"""The speed/size ladder: MAC counts against torchvision's published numbers, the report on small models on every
runtime, the headline's baselines from fixed times, and this CPU's peaks from fake flag sets."""
import json
import shutil
from pathlib import Path

import onnx
import pytest
import torch

from vidopt import hardware, runtimes
from vidopt.bench import ladder
from vidopt.checkpoint import save_model_dir
from vidopt.config import DistillConfig
from vidopt.metrics import count_macs
from vidopt.models import StudentArch, TeacherArch, build_model
from vidopt.onnx_utils import int8_form_files, quantize_model_int8, takes_pixels


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


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return _fake_project(tmp_path_factory.mktemp("ladder") / "project")


@pytest.fixture(autouse=True)
def quick_timings(monkeypatch):
    monkeypatch.setattr(ladder, "MIN_SECONDS", 0.0)  # a few calls per model and runtime: these tests check structure


def test_ladder_reports_full_size_and_trained_rows(tmp_path, project):
    (tmp_path / "arch.json").write_text(STUDENT.model_dump_json())
    out = tmp_path / "report"
    report = ladder.main(["--arch", str(tmp_path / "arch.json"), "--teacher-width", "0.125",
                          "--shape", *map(str, SHAPE[1:]), "--project-dir", str(project), "--out", str(out),
                          "--threads", "1", "--rounds", "1", "--iters", "2", "--keep", str(tmp_path / "files")])

    assert json.loads((out / "ladder.json").read_text()) == report
    table = (out / "ladder.md").read_text()
    full = report["full_size"]
    kept = {path.name for path in (tmp_path / "files").glob("*.onnx")}   # (a)'s files, there to profile
    assert kept == {"full_teacher_fp32.onnx", "full_student_fp32.onnx", "full_student_int8.onnx"}
    # the int8 student's cell on each runtime is its fastest int8 form there, named, as the CPU target ranks them
    forms = set(int8_form_files(tmp_path / "files" / "full_student_int8_forms"))
    assert len(forms) > 1 and all(cell["int8_form"] in forms
                                  for cell in full["rows"]["student int8"]["runtimes"].values())
    assert "the fastest int8 form on each runtime" in table
    assert "random weights" in full["note"] and "random weights" in table
    assert set(full["rows"]) == {"teacher fp32", "student fp32", "student int8"}
    assert full["input"] == list(SHAPE) and full["teacher"]["arch"] == "r2plus1d_18"
    # The given arch's widths, with Kinetics-400's classes like the teacher it is compared with.
    assert full["student"]["conv_widths"] == STUDENT.conv_widths and full["student"]["num_classes"] == 400
    rows = full["rows"]
    assert rows["student int8"]["size_mb"] < rows["student fp32"]["size_mb"] < rows["teacher fp32"]["size_mb"]
    assert rows["teacher fp32"]["gmacs"] > 3 * rows["student fp32"]["gmacs"]
    # Every model on every runtime this machine has; each row's time is its fastest runtime's (by the quietest round).
    found = runtimes.available()
    assert list(report["runtimes"]) == found
    for r in rows.values():
        assert list(r["runtimes"]) == found
        assert r["fastest"] == min(found, key=lambda name: r["runtimes"][name]["best_p50_ms"])
        assert r["p50_ms"] == r["runtimes"][r["fastest"]]["p50_ms"]
        for name, cell in r["runtimes"].items():
            assert cell["gmac_s"] == pytest.approx(r["gmacs"] / (cell["p50_ms"] / 1e3))
            assert cell["precision"] == ladder.runtime_precision(name, r["quantized"])
    assert "| model | " + " | ".join(found) + " |" in table
    head = full["headline"]
    assert (head["teacher_runtime"], head["student_runtime"]) == (rows["teacher fp32"]["fastest"],
                                                                  rows["student int8"]["fastest"])
    assert full["speedup"] == head["speedup"] == pytest.approx(rows["teacher fp32"]["p50_ms"] /
                                                               rows["student int8"]["p50_ms"])
    ort = {name: r["runtimes"]["onnxruntime"]["p50_ms"] for name, r in rows.items()}
    assert head["onnxruntime_only"] == pytest.approx(ort["teacher fp32"] / ort["student int8"])
    assert f"on {head['teacher_runtime']}, each on its fastest runtime" in table and "onnxruntime only (" in table
    assert full["size_ratio"] == pytest.approx(rows["teacher fp32"]["size_mb"] / rows["student int8"]["size_mb"])
    assert full["meets_bars"]["size_ratio"] == (full["size_ratio"] >= 100)
    assert full["meets_bars"]["speedup"] == (full["speedup"] >= 100)
    assert report["machine"]["peaks"] == hardware.describe()["peaks"]

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
        assert list(r["runtimes"]) == found and r["p50_ms.t1"] == r["runtimes"][r["fastest.t1"]]["p50_ms.t1"]
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
    assert "pruned int8 vs pruned fp32 uint8-in: " in table and "the same uint8 input; no bar)" in table
    assert f"pruned int8 on {t['pruned int8']['fastest.t1']}, pruned fp32 uint8-in on " in table
    judged = [b for b in bars.values() if b["bar"] is not None]
    assert "pruned fp32 vs student fp32: " in table and table.count(" met)") == len(judged)
    assert (out / "ladder.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the same ladder, plotted
    for name in t:
        assert f"| {name} |" in table


def test_same_input_row_is_the_pruned_model_reading_uint8_pixels(tmp_path, project):
    ladder.trained_ladder(project, tmp_path, threads=[1], rounds=1, iters=2)
    assert takes_pixels(onnx.load(tmp_path / "pruned_fp32_uint8-in.onnx"))
    assert not takes_pixels(onnx.load(tmp_path / "pruned_fp32.onnx"))


def test_ladder_without_models_says_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match="run the pipeline first"):
        ladder.trained_ladder(tmp_path, tmp_path, threads=[1])


def test_rows_come_from_the_run_of_the_int8_models_seed(tmp_path, project):
    project = Path(shutil.copytree(project, tmp_path / "project"))  # adds a run: the shared project stays as it is
    config = {"clips": {"frames": SHAPE[1], "height": SHAPE[2], "width": SHAPE[3]}, "run": {"seed": 2}}
    other = project / "stages" / "train_teacher" / "seed2" / "model"   # a later run of another seed, teacher only
    save_model_dir(other, build_model(STUDENT).eval(), STUDENT, {"test_top1_clip": 0.9}, config)
    seed0 = project / "stages" / "train_teacher" / "key" / "model"
    assert ladder.find_model_dir(project, "train_teacher") == other
    assert ladder.find_model_dir(project, "train_teacher", seed=0) == seed0
    rows = ladder.trained_ladder(project, tmp_path, threads=[1], rounds=1, iters=2)["rows"]
    assert rows["teacher fp32"]["model_dir"] == str(seed0)


def test_full_size_student_is_the_projects_final_one_unless_an_arch_is_given(tmp_path, project):
    assert ladder.full_size_student(None, project).conv_widths == PRUNED.conv_widths  # the quantize stage's model
    (tmp_path / "arch.json").write_text(STUDENT.model_dump_json())
    assert ladder.full_size_student(tmp_path / "arch.json", project).conv_widths == STUDENT.conv_widths
    default = ladder.full_size_student(None, None)  # the pipeline's student at full size
    assert default == StudentArch(**DistillConfig().architecture()) and (default.frames, default.height) == (16, 112)


# Fixed p50 ms per (model, runtime): the teacher is fastest under the bf16 hint, the student int8 on plain OpenVINO.
FIXED_MS = {"teacher fp32": {"onnxruntime": 700.0, "openvino": 500.0, "openvino-bf16": 80.0},
            "student fp32": {"onnxruntime": 6.0, "openvino": 8.0, "openvino-bf16": 2.0},
            "student int8": {"onnxruntime": 2.5, "openvino": 1.0, "openvino-bf16": 1.25}}
ALL_RUNTIMES = list(runtimes.RUNTIMES)


def fixed_compare(times: dict):
    """A runtimes.compare that answers `times` (batch 8 takes 8 times as long), the quietest round 10% under p50."""
    def compare(candidates, input_shape, batch=1, threads=1, **_):
        out = {}
        for key, (runtime, _path) in candidates.items():
            model, _, form = key.split(" @ ")[0].partition(" [")   # an int8 form: "student int8 [name]"
            p50 = times[model][runtime] * batch * (2.0 if form == "slow]" else 1.0)
            out[key] = {"p50_ms": p50, "p95_ms": 1.1 * p50, "throughput_clips_s": batch * 1e3 / p50,
                        "best_p50_ms": 0.9 * p50}
        return out
    return compare


def test_headline_sets_the_student_on_its_fastest_runtime_against_the_teachers_fastest(tmp_path, monkeypatch):
    monkeypatch.setattr(ladder, "compare", fixed_compare(FIXED_MS))
    monkeypatch.setattr(ladder, "available", lambda: ALL_RUNTIMES)
    def two_forms(model, shape, path, clips, forms_dir):   # the files' contents do not matter with fixed times
        forms_dir.mkdir()
        for i in range(2):
            ladder.export_onnx(model, shape, forms_dir / f"form_{i}.onnx")
        (forms_dir / "forms.json").write_text(json.dumps({"forms": [{"name": "slow", "file": "form_0.onnx"},
                                                                    {"name": "fast", "file": "form_1.onnx"}]}))
        return ladder.export_onnx(model, shape, path)

    monkeypatch.setattr(ladder, "quantize_model_int8", two_forms)
    student = STUDENT.model_copy(update={"num_classes": 400})
    teacher = TeacherArch(arch="r2plus1d_18", width=0.125, num_classes=400)
    machine = {"cores": 2, "peaks": hardware.peaks({"avx512f", "amx_bf16", "amx_int8"}, ghz=2.0)}
    full = ladder.full_size_ladder(student, teacher, tmp_path, machine, rounds=1, iters=1)

    rows, head = full["rows"], full["headline"]
    assert [rows[n]["fastest"] for n in FIXED_MS] == ["openvino-bf16", "openvino-bf16", "openvino"]
    assert (head["teacher_runtime"], head["student_runtime"]) == ("openvino-bf16", "openvino")
    assert full["speedup"] == head["speedup"] == pytest.approx(80.0 / 1.0)
    assert {cell["int8_form"] for cell in rows["student int8"]["runtimes"].values()} == {"fast"}
    assert head["onnxruntime_only"] == pytest.approx(700.0 / 2.5)   # reported, not judged
    assert full["meets_bars"]["speedup"] is False                    # 80x against the teacher's fastest: under 100x
    # Each runtime's share of the peak of the precision it computes in, one core (1 thread).
    teacher_bf16 = rows["teacher fp32"]["runtimes"]["openvino-bf16"]
    assert teacher_bf16["precision"] == "bf16" and teacher_bf16["unit"] == "AMX-BF16"
    assert teacher_bf16["peak_share"] == pytest.approx(rows["teacher fp32"]["gmacs"] / 0.080 / (512 * 2.0))
    assert rows["student int8"]["runtimes"]["onnxruntime"]["peak_share"] == pytest.approx(
        rows["student fp32"]["gmacs"] / 0.0025 / (1024 * 2.0))
    assert rows["student fp32"]["runtimes"]["openvino"]["peak_share"] == pytest.approx(
        rows["student fp32"]["gmacs"] / 0.008 / (32 * 2.0))
    verdict = full["precision"]
    assert verdict["winner"] == "int8" and verdict["int8_runtime"] == "openvino"
    assert (verdict["int8_p50_ms"], verdict["bf16_p50_ms"]) == (1.0, 2.0)
    assert verdict["peak_ratio"] == pytest.approx(1024 / 512)   # AMX-INT8's peak over AMX-BF16's
    table = ladder.markdown({"runtimes": dict.fromkeys(ALL_RUNTIMES, "v"), "full_size": full})
    assert ("headline: student int8 on openvino vs teacher fp32 on openvino-bf16, each on its fastest runtime: "
            "**80.0x faster** (misses the 100x bar)") in table
    assert ("onnxruntime only (student int8 and teacher fp32 both on onnxruntime, not the bar's baseline): "
            "280.0x faster") in table
    assert "int8 wins for the student, 2.00x" in table
    assert "| teacher fp32 | 700.00 ms, " in table and "| **80.00 ms, " in table   # each model's fastest in bold


def test_trained_bars_compare_fastest_runtimes(tmp_path, monkeypatch, project):
    # The trained ladder's rows under fixed times: every rung fastest on a runtime of its own.
    times = {"teacher fp32": {"onnxruntime": 20.0, "openvino": 12.0, "openvino-bf16": 4.0},
             "student fp32": {"onnxruntime": 1.8, "openvino": 2.0, "openvino-bf16": 1.0},
             "pruned fp32": {"onnxruntime": 0.6, "openvino": 0.7, "openvino-bf16": 0.5},
             "pruned fp32 uint8-in": {"onnxruntime": 0.65, "openvino": 0.7, "openvino-bf16": 0.55},
             "pruned int8": {"onnxruntime": 0.25, "openvino": 0.2, "openvino-bf16": 0.21}}
    monkeypatch.setattr(ladder, "compare", fixed_compare(times))
    monkeypatch.setattr(ladder, "available", lambda: ALL_RUNTIMES)
    machine = {"cores": 2, "peaks": hardware.peaks({"avx512f", "avx512_bf16", "avx512_vnni"}, ghz=2.0)}
    trained = ladder.trained_ladder(project, tmp_path, threads=[1, 2], rounds=1, iters=1, machine=machine)

    rows = trained["rows"]
    assert rows["teacher fp32"]["fastest.t1"] == "openvino-bf16" and rows["pruned int8"]["fastest.t1"] == "openvino"
    bars = {(b["rung"], b["baseline"], b["measure"]): b for b in trained["bars"]}
    vs_teacher = bars["pruned int8", "teacher fp32", "speedup"]
    assert vs_teacher["value"] == pytest.approx(4.0 / 0.2) and vs_teacher["met"]
    assert (vs_teacher["rung_runtime"], vs_teacher["baseline_runtime"]) == ("openvino", "openvino-bf16")
    int8_gain = bars["pruned int8", "pruned fp32", "speedup"]   # against fp32's fastest: its fp32 file in bf16
    assert int8_gain["value"] == pytest.approx(0.5 / 0.2) and int8_gain["baseline_runtime"] == "openvino-bf16"
    assert trained["headline"]["onnxruntime_only"] == pytest.approx(20.0 / 0.25)
    assert rows["pruned int8"]["b8_clips_s.t1"] == pytest.approx(8e3 / (0.2 * 8))   # batch 8 on the same runtime
    # Two threads: a share of two cores' peak (no AMX here: VNNI and AVX-512 BF16).
    cell = rows["pruned int8"]["runtimes"]["openvino"]
    assert cell["unit"] == "AVX-512 VNNI"
    assert cell["peak_share.t2"] == pytest.approx(rows["pruned int8"]["gmacs"] / 0.0002 / (2 * 128 * 2.0))
    assert trained["precision"]["bf16_unit"] == "AVX-512 BF16"
    table = ladder.markdown({"runtimes": dict.fromkeys(ALL_RUNTIMES, "v"), "trained": trained})
    assert ("- pruned int8 vs teacher fp32: 20.00x faster (pruned int8 on openvino, teacher fp32 on openvino-bf16; "
            "bar >= 10x, met)") in table
    assert "| model | onnxruntime (1 thr) | openvino (1 thr) | openvino-bf16 (1 thr) | onnxruntime (2 thr) |" in table
    assert ladder.ladder_png(trained)[:4] == b"\x89PNG"   # each rung on its fastest runtime


@pytest.mark.parametrize("flags, expected", [
    ({"avx512f", "fma", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "avx_vnni"},
     {"fp32": ("AVX-512 FMA", 32), "bf16": ("AMX-BF16", 512), "int8": ("AMX-INT8", 1024)}),   # Sapphire Rapids
    ({"avx512f", "fma", "avx512_vnni", "avx512_bf16"},
     {"fp32": ("AVX-512 FMA", 32), "bf16": ("AVX-512 BF16", 64), "int8": ("AVX-512 VNNI", 128)}),   # Zen 4, Cooper L.
    ({"avx2", "fma", "avx_vnni"}, {"fp32": ("AVX2 FMA", 16), "bf16": None, "int8": ("AVX-VNNI", 64)}),   # Alder Lake
    ({"avx2", "fma"}, {"fp32": ("AVX2 FMA", 16), "bf16": None, "int8": None}),   # Zen 3: no VNNI, no peak claimed
])
def test_peaks_follow_the_cpu_flags(flags, expected):
    peaks = hardware.peaks(flags, ghz=2.5)
    for precision, want in expected.items():
        got = peaks[precision]
        assert (None if got is None else (got["unit"], got["macs_per_cycle"])) == want
        assert got is None or got["gmac_s_per_core"] == pytest.approx(want[1] * 2.5)


CPUINFO = "".join(f"processor\t: {i}\nmodel name\t: Test CPU\nphysical id\t: 0\ncore id\t\t: {i // 2}\n"
                  f"cpu MHz\t\t: {mhz}\nflags\t\t: fpu avx2 fma avx512f amx_int8\n\n"
                  for i, mhz in enumerate([1800.0, 3100.5, 2400.0, 2400.0]))


def test_clock_is_cpufreqs_maximum_else_the_highest_cpu_mhz(tmp_path):
    assert hardware.clock_ghz(CPUINFO, tmp_path / "absent") == (pytest.approx(3.1005), "the highest cpu MHz in "
                                                                "/proc/cpuinfo")
    (tmp_path / "cpuinfo_max_freq").write_text("3500000\n")   # kHz
    assert hardware.clock_ghz(CPUINFO, tmp_path / "cpuinfo_max_freq") == (3.5, str(tmp_path / "cpuinfo_max_freq"))
    with pytest.raises(RuntimeError, match="no 'cpu MHz'"):
        hardware.clock_ghz("flags : avx2\n", tmp_path / "absent")


def test_describe_counts_cores_not_smt_siblings(tmp_path):
    (tmp_path / "cpuinfo").write_text(CPUINFO)
    machine = hardware.describe(tmp_path / "cpuinfo", tmp_path / "absent")
    assert machine["model"] == "Test CPU" and machine["cores"] == 2   # four logical CPUs on two cores
    assert machine["flags"] == ["amx_int8", "avx512f", "fma"]
    assert machine["peaks"]["int8"]["unit"] == "AMX-INT8" and machine["peaks"]["bf16"] is None
    share = hardware.peak_share(gmacs=1.0, p50_ms=2.0, precision="int8", threads=8, machine=machine)
    assert share["gmac_s"] == pytest.approx(500.0)
    assert share["peak_share"] == pytest.approx(500.0 / (2 * 1024 * 3.1005))   # 8 threads: still 2 cores' units
    assert hardware.peak_share(1.0, 2.0, "bf16", 1, machine)["peak_share"] is None
