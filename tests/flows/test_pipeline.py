"""The pipeline flow under Prefect's test harness (a real temporary Prefect server) with a real sqlite MLflow store."""
import time
from pathlib import Path

import pytest
import mlflow
from mlflow.tracking import MlflowClient
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_pipeline_runs_every_stage_and_tracks_it_in_mlflow(prefect_server, tiny_ladder, capsys):
    from flows.pipeline import pipeline
    from flows.summary import print_summary

    cfg, stages = tiny_ladder
    cfg = cfg.model_copy(update={
        "run": cfg.run.model_copy(update={"name": "flow-test"}),
        "tracking": cfg.tracking.model_copy(update={"experiment": "flow-test"}),
        "export": cfg.export.model_copy(update={"targets": ["cpu"]}),  # all targets: tests/tasks/test_export.py
    })
    state = pipeline(cfg, return_state=True)
    result = state.result()

    # [Prefect] vidopt's own lines are in the flow run's logs, and the run's summary is an artifact on its page.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

    flow_run = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 30   # logs reach the API in batches, a moment after the run

        def said(logger: str, text: str) -> bool:   # every page of the run's logs: one page holds 200
            found, page = [], None
            while page is None or len(page) == 200:
                page = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run])), limit=200,
                                        offset=len(found))
                found += page
            return any(log.name == logger and text in log.message for log in found)
        while not (said("vidopt.pools", "export: cpu ok") and said("vidopt.register", "register: vidopt-cpu")):
            assert time.monotonic() < deadline, "vidopt's export and register lines never reached the run's logs"
            time.sleep(1)
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run])))
    assert artifact.key == "vidopt-run" and "| int8 |" in artifact.data and result["mlflow_run_id"] in artifact.data

    # Unchanged inputs: every model stage found its finished directory instead of training again.
    for name in ("teacher", "student", "pruned", "int8"):
        assert result["ladder"][name]["weights_sha256"] == stages[name].weights_sha256
    client = MlflowClient(tracking_uri=f"sqlite:///{Path(cfg.run.project_dir).resolve() / 'mlflow.db'}")
    parent = client.get_run(result["mlflow_run_id"])
    dataset = result["dataset"]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "flow-test"
    assert parent.data.tags["data_version"] == dataset["data_version"]
    assert parent.data.tags["config_hash"] == cfg.config_hash()
    assert parent.data.tags["code_version"]
    assert parent.data.params["clips.frames"] == str(cfg.clips.frames)

    def children(run_id):
        return {c.info.run_name: c for c in client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")}

    stage_runs = children(parent.info.run_id)
    # Each names the other; every stage with a key of its own records it, for a later cached run to link.
    assert parent.data.tags["vidopt.prefect_flow_run_id"] == str(flow_run)
    assert all(run.data.tags.get("vidopt.stage_key") for name, run in stage_runs.items() if name != "ingest")
    # The model stages were finished by the tiny_ladder fixture, outside Prefect: the flow still ran their tasks
    # (nothing in Prefect's cache yet), which found the finished stage dirs.
    assert set(stage_runs) == {"ingest", "train_teacher", "distill", "prune", "quantize", "export-cpu", "register",
                               "report"}   # crossval is off (data.folds 0); each export target is a run of its own
    ingest = stage_runs["ingest"]
    assert ingest.data.metrics["videos"] == dataset["num_videos"] > 0
    artifacts = {a.path for a in client.list_artifacts(ingest.info.run_id, "dataset")}
    assert artifacts == {"dataset/manifest.jsonl", "dataset/quarantine.jsonl"}
    cpu = stage_runs["export-cpu"]
    assert cpu.data.tags["status"] == "ok" and cpu.data.tags["target"] == "cpu"
    [version] = client.search_model_versions("name='vidopt-cpu'")  # a registered model version for the target
    assert version.tags["data_version"] == dataset["data_version"] and version.tags["config_hash"] == cfg.config_hash()
    assert client.get_model_version_by_alias("vidopt-cpu", "challenger").version == version.version
    [decision] = result["registry"]
    assert decision["version"] == version.version and decision["gates"]
    assert version.tags["promoted"] == str(decision["champion"]).lower()
    # The tiny profile's models are at chance: registered, refused, and the registry says why with its numbers.
    gates = {g["name"]: g for g in decision["gates"]}
    assert not decision["champion"] and not gates["above_majority"]["passed"]
    assert "above_majority" in decision["reason"] and "vs always answering" in gates["above_majority"]["detail"]
    assert version.tags["gate.above_majority"].startswith("fail: ")
    assert "95% CI" in gates["above_majority"]["detail"] and version.tags["top1_ci"]
    report = stage_runs["report"]
    assert {a.path for a in client.list_artifacts(report.info.run_id, "report")} >= {"report/report.html",
                                                                                      "report/pareto.png"}
    # The parent run carries the summary a runs table compares; the experiment opens on that table.
    summary = client.get_run(parent.info.run_id).data.metrics
    assert summary["int8.test_top1_clip"] == result["ladder"]["int8"]["metrics"]["test_top1_clip"]
    assert summary["cpu.latency_ms"] > 0 and "teacher.test_top1_video" in summary and "int8.speedup.b1.t1" in summary
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    # The CPU target's version is an MLflow model with a signature
    assert mlflow.models.get_model_info(f"models:/vidopt-cpu/{version.version}").signature is not None
    # Artifacts live beside mlflow.db in the project dir, not in the current directory.
    assert Path(cfg.run.project_dir, "mlartifacts").is_dir() and not Path("mlruns").exists()

    print_summary(cfg, result)
    table = capsys.readouterr().out
    for row in ("teacher", "student", "pruned", "int8", "cpu"):
        assert f"\n{row} " in table
    assert "vidopt-cpu" in table and f"report: {result['report']['html_uri']}" in table
    assert "above_majority: FAIL" in table                     # the refusal, in the run summary too
    assert "The teacher did not teach" in table and "95% CI" in table   # and the report's headline and intervals
    int8 = result["ladder"]["int8"]["metrics"]  # the int8 row shows both speed-ups the quantize stage measured
    assert f"{int8['speedup.b1.t1']:.2f}x vs fp32" in table
    assert f"quietest rounds {int8['speedup_quietest.b1.t1']:.2f}x)" in table


def test_reruns_come_from_prefects_cache_and_a_quantize_change_reruns_only_what_follows(prefect_server, tiny_ladder):
    from flows.bench_rerun import task_states
    from flows.pipeline import pipeline

    cfg, _ = tiny_ladder
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"experiment": "rerun-test"}),
                                 "export": cfg.export.model_copy(update={"targets": ["cpu"]})})
    pipeline(cfg)  # fills Prefect's cache (the model stages themselves were finished by the fixture)
    unchanged_run = pipeline(cfg, return_state=True)
    unchanged = task_states(unchanged_run)
    assert unchanged.pop("ingest") == "Completed"  # always lists the source: new clips may have arrived
    assert set(unchanged.values()) == {"Cached"}, unchanged
    assert set(unchanged) == {"train_teacher", "distill", "prune", "quantize", "export", "register", "crossval",
                              "report"}
    # The cached stages are in the run's MLflow tree all the same: a child each, linking the run that produced the
    # result (crossval, off, logs none).
    client = MlflowClient(f"sqlite:///{Path(cfg.run.project_dir).resolve() / 'mlflow.db'}")
    parent_id = unchanged_run.result()["mlflow_run_id"]
    stage_runs = {run.info.run_name: run for run in client.search_runs(
        [client.get_run(parent_id).info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")}
    assert set(stage_runs) == {"ingest", "train_teacher", "distill", "prune", "quantize", "export-cpu", "register",
                               "report"}
    assert "vidopt.cached_from_run_id" not in stage_runs.pop("ingest").data.tags
    for name, link in stage_runs.items():
        original = client.get_run(link.data.tags["vidopt.cached_from_run_id"])
        assert original.info.status == "FINISHED" and original.info.run_name == name
        assert original.data.tags["mlflow.parentRunId"] != parent_id
        assert original.data.tags["vidopt.stage_key"] == link.data.tags["vidopt.cached_stage_key"]
        assert link.info.status == "FINISHED" and link.data.metrics == original.data.metrics, name

    # per-tensor weight scales: a quantize change whose int8 file surely differs. (Downstream stages key on that
    # file's hash, so a change giving the same bytes rightly leaves them cached: with float logits, 8 calibration
    # clips instead of 16 gave the tiny model the same activation ranges and the same file.)
    changed = cfg.model_copy(update={"quantize": cfg.quantize.model_copy(update={"per_channel": False})})
    states = task_states(pipeline(changed, return_state=True))
    assert {name for name, state in states.items() if state == "Cached"} == {"train_teacher", "distill", "prune",
                                                                              "crossval"}
    assert {name for name, state in states.items() if state == "Completed"} == {
        "ingest", "quantize", "export", "register", "report"}


def test_pipeline_fails_cleanly_when_nothing_is_usable(prefect_server, tiny_cfg, tmp_path):
    from flows.pipeline import pipeline
    from vidopt.ingestion import IngestError

    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "x.mp4").write_text("not a video")
    cfg = tiny_cfg(f"data.source={tmp_path / 'src'}", "tracking.experiment=flow-fail")
    with pytest.raises(IngestError, match="no usable videos"):
        pipeline(cfg)
    client = MlflowClient(f"sqlite:///{Path(cfg.run.project_dir).resolve() / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("flow-fail").experiment_id])
    # One parent and one ingest run, both failed: bad input is not retried.
    assert sorted(r.info.run_name for r in runs if r.info.status == "FAILED") == sorted(
        [r.info.run_name for r in runs]) and len(runs) == 2
