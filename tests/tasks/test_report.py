"""The report stage: files in its stage dir, a nested MLflow run holding them, and the real ladder's metric names."""
import json
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tasks import report
from tests.vidopt.test_report import hand_made_ladder, hand_made_targets
from vidopt.artifacts import DatasetArtifact, TargetResult
from vidopt.report import terminal_summary
from vidopt.stages import open_store
from vidopt.tracking import configure_mlflow

FILES = {"report.html", "pareto.png", "rows.json", "report.txt"}


def hand_made_dataset() -> DatasetArtifact:
    return DatasetArtifact(uri="/data", manifest_uri="/data/manifest.jsonl", quarantine_uri="/data/quarantine.jsonl",
                           manifest_sha256="ab" * 32, data_version="v1", classes=["left", "right"],
                           class_counts={}, num_videos=10, num_quarantined=0, downloaded=0)


def test_report_task_writes_the_stage_dir_and_logs_a_nested_run(tiny_cfg):
    cfg = tiny_cfg("tracking.experiment=report-test", "report.profiles.gpu.usd_per_hour=3.6")
    configure_mlflow(cfg)
    with mlflow.start_run() as parent:
        record = report.report_task.fn(cfg, hand_made_dataset(), **hand_made_ladder(), targets=hand_made_targets(),
                                       registry=[], parent_run_id=parent.info.run_id)

    work = Path(record.uri)
    assert work.parents[1] == Path(cfg.run.project_dir).resolve() / "stages" / "report"
    assert {p.name for p in work.iterdir()} == FILES | {"_COMPLETE.json"}   # published whole to the store
    assert record.best["gpu"]["variant"] == "gpu/ort_fp16"           # the 2-point default budget
    assert record.best["gpu"]["usd_per_million"] == pytest.approx(3.6 * 1500 / 3600)
    assert record.best["fpga"]["variant"] is None and "skipped" in record.best["fpga"]["reason"]
    table, html_path = terminal_summary(record.model_dump(), open_store(cfg.run))
    assert html_path == str(work / "report.html") and "ort_fp16 (best)" in table

    client = MlflowClient()
    (stage,) = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert stage.info.run_name == "report" and stage.data.tags["best.gpu"] == "gpu/ort_fp16"
    assert stage.data.tags["best.fpga"] == "none"
    assert stage.data.metrics["best.gpu.usd_per_1m_clips_estimate"] == pytest.approx(1.5)
    assert {a.path for a in client.list_artifacts(stage.info.run_id, "report")} == {f"report/{f}" for f in FILES}

    # Same inputs: the same stage dir; a tighter budget is another config, so another dir.
    assert report.run(cfg, hand_made_dataset(), **hand_made_ladder(), targets=hand_made_targets()).uri == record.uri
    tight = cfg.model_copy(update={"budgets": cfg.budgets.model_copy(update={"max_latency_ms": 1.0})})
    assert report.run(tight, hand_made_dataset(), **hand_made_ladder(), targets=hand_made_targets()).uri != record.uri


def test_report_reads_the_metrics_the_real_ladder_writes(tiny_ladder):
    cfg, stages = tiny_ladder
    ladder = {name: stages[name] for name in ("teacher", "student", "pruned", "int8")}
    int8 = stages["int8"].metrics
    cpu = TargetResult(target="cpu", status="ok", runtime="onnxruntime CPUExecutionProvider (1 thread(s))",
                       top1=int8["test_top1_clip"], latency_ms=int8["latency.int8.b1.t1.p50_ms"], artifact_bytes=1000)
    record = report.run(cfg, stages["dataset"], **ladder, targets=[cpu])

    rows = {p["label"]: p for p in json.loads(Path(record.rows_uri).read_text())["points"]}
    assert rows["ladder/int8"]["latency_ms"] == int8["latency.int8.b1.t1.p50_ms"]
    assert rows["ladder/pruned fp32"]["latency_ms"] == int8["latency.fp32.b1.t1.p50_ms"]
    assert rows["ladder/pruned fp32"]["top1"] == stages["pruned"].metrics["test_top1_clip"]
    assert rows["ladder/int8"]["artifact_bytes"] == int(int8["size_int8_mb"] * 1e6)
    assert rows["ladder/teacher fp32"]["artifact_bytes"] == stages["teacher"].metrics["size_bytes"]
    assert rows["cpu/shipped"]["kwh_per_million"] > 0 and rows["cpu/shipped"]["on_device"]
    fits = stages["teacher"].metrics["test_top1_clip"] - int8["test_top1_clip"] <= cfg.budgets.max_top1_drop + 1e-9
    assert record.best["cpu"]["variant"] == ("cpu/shipped" if fits else None)
