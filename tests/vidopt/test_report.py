"""The run report on hand-made ladders and target results: Pareto flags, budgets, estimates, HTML, PNG, text."""
import base64
import io
import json
import re

import pytest
from matplotlib.image import imread

from vidopt.artifacts import ModelArtifact, TargetResult
from vidopt.config import BudgetConfig, TargetProfile, TargetProfiles
from vidopt.report import (ESTIMATE_NOTE, Point, build_report, estimate_per_million, ladder_points, pareto_front,
                           pareto_png, render_html, terminal_summary, write_report)
from vidopt.store import store_for

CPU_ORT = "onnxruntime 1.32.0 CPUExecutionProvider (1 thread(s))"
EVIL = "<script>alert(1)</script>$x^{"  # HTML to escape, and mathtext that matplotlib must not parse


def model(kind: str, top1: float, **metrics) -> ModelArtifact:
    return ModelArtifact(uri=f"/runs/{kind}", kind=kind, arch={}, weights_sha256=kind * 4, data_version="v1",
                         metrics={"test_top1_clip": top1, "test_top1_video": top1, "macs": 1e8, "params": 1e5,
                                  **metrics})


def hand_made_ladder() -> dict[str, ModelArtifact]:
    """Metric names as the stages write them; only the quantize stage times models (int8, and fp32 beside it)."""
    return {"teacher": model("teacher", 0.80, size_bytes=8_000_000),
            "student": model("student", 0.79, size_bytes=1_200_000),
            "pruned": model("pruned", 0.785, size_bytes=360_000),
            "int8": model("int8", 0.76, size_int8_mb=0.12, size_fp32_mb=0.36,
                          **{"latency.int8.b1.t1.p50_ms": 0.40, "latency.fp32.b1.t1.p50_ms": 0.50,
                             "latency.int8.b1.t2.p50_ms": 0.30, "latency.fp32.b1.t2.p50_ms": 0.35,
                             "latency.int8.b8.t1.p50_ms": 2.0})}


def hand_made_targets() -> list[TargetResult]:
    gpu_variants = {
        "ort_int8": {"runtime": CPU_ORT, "top1": 0.76, "latency_ms": 0.25, "bytes": 130_000},
        "ort_fp16": {"runtime": CPU_ORT, "top1": 0.78, "latency_ms": 1.5, "bytes": 600_000},
        "aoti": {"error": "RuntimeError: no compiler"},
    }
    return [
        TargetResult(target="cpu", status="ok", runtime=CPU_ORT, top1=0.76, latency_ms=0.25, artifact_bytes=120_000),
        TargetResult(target="gpu", status="ok", runtime=CPU_ORT, top1=0.76, latency_ms=0.25, artifact_bytes=900_000,
                     extra={"variants": gpu_variants}),
        TargetResult(target="tpu", status="failed", reason="reloaded StableHLO differs from PyTorch by 3e-2"),
        TargetResult(target="fpga", status="skipped", reason="hls4ml is not importable; pip install hls4ml"),
    ]


def by_label(report) -> dict[str, Point]:
    return {p.label: p for p in report.points}


def test_pareto_front_on_hand_made_points():
    points = [Point("a", "fast", top1=0.70, latency_ms=1.0), Point("a", "slow-good", top1=0.90, latency_ms=10.0),
              Point("b", "dominated", top1=0.80, latency_ms=12.0), Point("b", "tie", top1=0.90, latency_ms=10.0),
              Point("b", "middle", top1=0.80, latency_ms=5.0), Point("c", "no-latency", top1=0.99)]
    assert pareto_front(points) == [True, True, False, True, True, False]


def test_ladder_points_take_latency_from_the_quantize_stage():
    points = {p.variant: p for p in ladder_points(hand_made_ladder(), threads=2)}
    assert points["int8"].latency_ms == 0.30 and "2 thread(s)" in points["int8"].runtime
    assert points["pruned fp32"].latency_ms == 0.35       # the fp32 export timed beside int8
    assert points["int8"].artifact_bytes == 120_000 and points["teacher fp32"].artifact_bytes == 8_000_000
    assert not points["teacher fp32"].plotted and "not timed" in points["teacher fp32"].note
    # A thread count that was not timed falls back to the fewest threads timed.
    assert {p.variant: p for p in ladder_points(hand_made_ladder(), threads=4)}["int8"].latency_ms == 0.40


def test_budgets_pick_the_fastest_variant_that_fits():
    ladder, targets = hand_made_ladder(), hand_made_targets()
    strict = build_report(ladder, targets, BudgetConfig(max_top1_drop=0.02), TargetProfiles())
    # Teacher 80%: only ort_fp16 (78%) stays within 2 points; the int8 variants lose 4.
    assert strict.best["gpu"]["variant"] == "gpu/ort_fp16"
    assert strict.best["cpu"]["variant"] is None and "4.00 points below the teacher" in strict.best["cpu"]["reason"]
    assert strict.best["tpu"] == {"variant": None, "reason": "target failed: reloaded StableHLO differs from "
                                                             "PyTorch by 3e-2"}
    assert strict.best["fpga"]["reason"].startswith("target skipped: hls4ml")

    loose = build_report(ladder, targets, BudgetConfig(max_top1_drop=0.05), TargetProfiles())
    assert loose.best["gpu"]["variant"] == "gpu/ort_int8"   # both fit: the faster one

    tight = build_report(ladder, targets, BudgetConfig(max_top1_drop=0.05, max_latency_ms=1.0, max_artifact_mb=0.1),
                         TargetProfiles())
    assert tight.best["gpu"]["variant"] is None
    reason = tight.best["gpu"]["reason"]
    assert "latency 1.50 ms > 1 ms" in reason and "artifact 0.13 MB > 0.1 MB" in reason
    assert "aoti" not in reason   # a variant that errored has no top-1 to judge
    assert by_label(tight)["gpu/aoti"].note == "failed: RuntimeError: no compiler"


def test_a_target_without_latency_can_be_best_only_without_a_latency_budget():
    fpga = TargetResult(target="fpga", status="ok", runtime="hls4ml 1.3.0 C++ emulation (Vitis backend, g++)",
                        top1=0.79, artifact_bytes=50_000, extra={"latency_note": "hls4ml estimates no latency"})
    free = build_report(hand_made_ladder(), [fpga], BudgetConfig(), TargetProfiles())
    point = by_label(free)["fpga/shipped"]
    assert free.best["fpga"]["variant"] == "fpga/shipped"
    assert not point.plotted and point.kwh_per_million is None and point.note == "hls4ml estimates no latency"
    assert not point.on_device                  # C++ emulation, not an FPGA
    capped = build_report(hand_made_ladder(), [fpga], BudgetConfig(max_latency_ms=5), TargetProfiles())
    assert capped.best["fpga"]["variant"] is None and "latency not measured" in capped.best["fpga"]["reason"]


def test_the_cpu_point_says_which_int8_form_shipped_and_why():
    forms = {"frames_per_stem=1": 0.25, "frames_per_stem=4": 0.19, "frames_per_stem=4, pool_as_conv=True": 0.21}
    cpu = TargetResult(target="cpu", status="ok", runtime=CPU_ORT, top1=0.76, latency_ms=0.2, artifact_bytes=90_000,
                       extra={"int8_form": "frames_per_stem=4", "int8_forms_best_p50_ms": forms})
    point = by_label(build_report(hand_made_ladder(), [cpu], BudgetConfig(), TargetProfiles()))["cpu/shipped"]
    assert point.note == ("int8 form frames_per_stem=4: the fastest of 3 on this machine (0.190 ms in its quietest "
                          "round; the others 0.210-0.250)")
    alone = cpu.model_copy(update={"extra": {"int8_form": "model_int8.onnx", "int8_forms_best_p50_ms": {}}})
    unranked = build_report(hand_made_ladder(), [alone], BudgetConfig(), TargetProfiles())
    assert by_label(unranked)["cpu/shipped"].note == ""
    # a form left out for agreeing below the budget is named with its agreement; ranked forms are those within it
    agreement = {**{name: 1.0 for name in forms}, "frames_per_stem=2": 0.9898}
    gated = cpu.model_copy(update={"extra": {**cpu.extra, "int8_forms_argmax_agreement": agreement,
                                             "min_argmax_agreement": 0.99}})
    note = by_label(build_report(hand_made_ladder(), [gated], BudgetConfig(), TargetProfiles()))["cpu/shipped"].note
    assert note.endswith("; not shipped, argmax agreement below 0.99: frames_per_stem=2 (0.9898)")


def test_estimates_come_from_the_profile_and_the_measured_latency():
    profile = TargetProfile(device="test part", watts=100, usd_per_hour=3.6)
    # 36 ms x 1e6 clips = 36,000 s = 10 h: 100 W -> 1 kWh, $3.6/h -> $36.
    assert estimate_per_million(36.0, profile) == pytest.approx((1.0, 36.0))

    profiles = TargetProfiles(gpu=profile, cpu=TargetProfile(device="vm", watts=36, usd_per_hour=0.36))
    report = build_report(hand_made_ladder(), hand_made_targets(), BudgetConfig(), profiles)
    fp16 = by_label(report)["gpu/ort_fp16"]        # 1.5 ms: 1500 s per million clips
    assert fp16.kwh_per_million == pytest.approx(100 * 1500 / 3.6e6)
    assert fp16.usd_per_million == pytest.approx(3.6 * 1500 / 3600)
    ladder_int8 = by_label(report)["ladder/int8"]   # the ladder ran on onnxruntime CPU: CPU profile
    assert ladder_int8.usd_per_million == pytest.approx(0.36 * 400 / 3600)
    assert by_label(report)["ladder/teacher fp32"].kwh_per_million is None     # no latency, no estimate
    # The GPU's numbers were measured on onnxruntime's CPU provider: a stand-in, and marked so.
    assert not fp16.on_device and by_label(report)["cpu/shipped"].on_device


def test_html_embeds_the_plot_labels_estimates_and_escapes_names(tmp_path):
    targets = hand_made_targets() + [
        TargetResult(target=EVIL, status="skipped", reason=f"no pool for {EVIL}"),
        TargetResult(target="edge", status="ok", runtime=f"runtime {EVIL}", top1=0.7, latency_ms=3.0,
                     artifact_bytes=10, extra={"variants": {EVIL: {"runtime": EVIL, "top1": 0.7, "latency_ms": 3.0}}}),
    ]
    report = build_report(hand_made_ladder(), targets, BudgetConfig(), TargetProfiles(), context={"run": EVIL})
    paths = write_report(report, tmp_path / "report")
    page = paths["html"].read_text()

    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    png = base64.b64decode(re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page).group(1))
    assert png == paths["plot"].read_bytes()
    height, width, channels = imread(io.BytesIO(png)).shape
    assert height > 300 and width > 500 and channels in (3, 4)
    assert page.count("(estimate)") >= 4 and "Estimates, not measurements." in page
    assert "stand-in, not the target&#x27;s device" in page   # the GPU rows ran on a CPU provider
    assert "hls4ml is not importable" in page                  # skipped targets appear with their reason

    rows = json.loads(paths["rows"].read_text())
    assert {p["label"] for p in rows["points"] if p["plotted"]} >= {"gpu/ort_int8", "ladder/int8"}
    assert rows["estimate_note"] == ESTIMATE_NOTE
    table, html_path = terminal_summary({"table_uri": str(paths["table"]), "html_uri": str(paths["html"])},
                                        store_for(str(tmp_path)))
    assert html_path == str(paths["html"])
    # ort_fp16 is not on the front (ladder/pruned fp32 is more accurate and faster), yet the GPU's best.
    assert re.search(r"^gpu +ort_fp16 \(best\) +78\.0 +1\.50 +0\.600 +fits", table, re.M)
    assert re.search(r"^gpu +ort_fp16 +78\.0 +1\.50 .*NVIDIA L4.*\[stand-in", table, re.M)   # best per target
    assert re.search(r"^fpga +none .*target skipped: hls4ml", table, re.M)


def test_plot_without_any_timed_point_is_still_an_image():
    teacher_only = {"teacher": model("teacher", 0.8, size_bytes=1)}
    report = build_report(teacher_only, [], BudgetConfig(), TargetProfiles())
    assert imread(io.BytesIO(pareto_png(report))).ndim == 3
    assert "<img" in render_html(report, pareto_png(report))


def test_a_target_that_chose_among_variants_heads_with_the_one_it_serves_and_says_why():
    from vidopt.report import target_points

    variants = {"tensorrt_int8": {"runtime": "TensorRT 10 int8 on L4", "top1": 0.76, "latency_ms": 0.08},
                "ort_int8": {"runtime": "onnxruntime CUDAExecutionProvider", "top1": 0.76, "latency_ms": 0.21},
                "aoti": {"runtime": "torch AOTInductor float16 on L4", "top1": 0.76, "latency_ms": 0.21}}
    result = TargetResult(target="gpu", status="ok", runtime=variants["aoti"]["runtime"], top1=0.76, latency_ms=0.21,
                          extra={"variants": variants, "shipped": "aoti", "fastest": "tensorrt_int8",
                                 "faithful": ["ort_int8", "aoti"], "min_argmax_agreement": 0.99})
    points = {p.variant: p for p in target_points(result)}
    assert [name for name, p in points.items() if p.headline] == ["aoti"]   # not ort_int8, tied in latency and top-1
    assert "the fastest of 2 faithful servable" in points["aoti"].note
    assert "tensorrt_int8 ran faster (0.080 ms) but is not served" in points["aoti"].note
    result.extra.update(faithful=[], fastest="aoti")
    assert "no servable variant agrees with the reference within 0.99" in target_points(result)[2].note
