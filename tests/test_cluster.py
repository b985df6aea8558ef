"""The whole tiny pipeline on a 4-node Ray cluster whose only shared storage is S3 (a moto server process on
127.0.0.1): a CPU-only head that runs the flow, and nodes declaring the GPU, TPU and FPGA resources, each with a cache
directory of its own. Training and the teacher's logits go to the GPU node (which has no CUDA here: it trains on its
CPU and says so), each export target to its node. Every job record carries store URIs only; what a node read, it
fetched from S3 into its own cache.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import boto3
import pytest
import ray
from mlflow.tracking import MlflowClient
from prefect.testing.utilities import prefect_test_harness
from ray.cluster_utils import Cluster

from vidopt.config import load_config

REPO = Path(__file__).resolve().parents[1]
BUCKET = "vidopt-cluster"
pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(moto_server, tmp_path):
    """Head (2 CPUs, no accelerator) + one node per accelerator pool, each with its own VIDOPT_NODE_CACHE (the
    workers a node starts inherit its environment). Yields (address, {node: cache dir})."""
    ray.shutdown()
    caches = {name: tmp_path / f"node-{name}" for name in ("head", "gpu", "tpu", "fpga")}
    saved = os.environ.get("VIDOPT_NODE_CACHE")
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    os.environ.update(env)
    os.environ["VIDOPT_NODE_CACHE"] = str(caches["head"])
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    for name, resources in (("gpu", {"num_gpus": 1}), ("tpu", {"resources": {"TPU": 1}}),
                            ("fpga", {"resources": {"FPGA": 1}})):
        os.environ["VIDOPT_NODE_CACHE"] = str(caches[name])
        nodes.add_node(num_cpus=0, **resources)
    if saved is None:
        os.environ.pop("VIDOPT_NODE_CACHE")
    else:
        os.environ["VIDOPT_NODE_CACHE"] = saved
    yield nodes.address, caches
    ray.shutdown()
    nodes.shutdown()


def _upload(sample_dir: Path, prefix: str) -> None:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    for path in sorted(sample_dir.rglob("*.mp4")):
        s3.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(sample_dir).as_posix()}")


def _store_objects(prefix: str) -> dict[str, bytes]:
    s3 = boto3.client("s3")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
            for o in page.get("Contents", [])]
    return {k: s3.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys if k.endswith(".json")}


def test_tiny_pipeline_runs_on_four_nodes_sharing_only_s3(cluster, sample_dir, tmp_path):
    from flows.pipeline import pipeline

    address, caches = cluster
    _upload(sample_dir, "clips")
    driver = tmp_path / "driver"
    cfg = load_config("tiny", [f"run.project_dir={driver}", f"run.artifact_root=s3://{BUCKET}/runs",
                               f"data.source=s3://{BUCKET}/clips", f"ray.address={address}",
                               "tracking.experiment=cluster"])
    with prefect_test_harness(server_startup_timeout=120):
        result = pipeline(cfg)

    statuses = {t["target"]: (t["status"], t["reason"]) for t in result["targets"]}
    assert {t: s for t, (s, _) in statuses.items()} == dict.fromkeys(("cpu", "gpu", "tpu", "fpga"), "ok"), statuses
    for name in ("teacher", "student", "pruned", "int8"):
        assert result["ladder"][name]["uri"].startswith(f"s3://{BUCKET}/runs/stages/")
    assert all(t["artifact_uri"].startswith(f"s3://{BUCKET}/runs/") for t in result["targets"])
    assert result["report"]["html_uri"].startswith(f"s3://{BUCKET}/runs/")

    # Every job sent to a node (export jobs, training jobs) names store URIs, never a path of the driver.
    records = _store_objects("runs/")
    jobs = {k: v for k, v in records.items() if k.endswith((".job.json", "jobs.json"))}
    assert any(k.endswith("jobs.json") for k in jobs) and sum(k.endswith(".job.json") for k in jobs) >= 3
    for key, body in jobs.items():
        assert str(driver).encode() not in body and str(tmp_path).encode() not in body, key
    export_jobs = json.loads(next(v for k, v in jobs.items() if k.endswith("jobs.json")))
    assert all(j["model"].startswith("s3://") and j["eval_clips"]["uri"].startswith("s3://") for j in export_jobs)

    # What each node read, it fetched from S3 into its own cache: the GPU node the videos it trained the teacher on
    # (by content hash) and the clip sets, the TPU and FPGA nodes the int8 model folder.
    gpu_files = [p for p in (caches["gpu"] / "files").rglob("*") if p.is_file()]
    assert any(p.suffix == ".mp4" for p in gpu_files) and any(p.suffix == ".pt" for p in gpu_files)
    for node in ("tpu", "fpga"):
        assert list((caches[node] / "dirs").glob("*/model_int8.onnx")), node

    # The teacher trained on the GPU node, which has no CUDA here: on its CPU, and both the record and MLflow say so.
    teacher = result["ladder"]["teacher"]
    assert "CUDA is not available" in teacher["notes"]["trained_on"]
    client = MlflowClient(tracking_uri=f"sqlite:///{driver.resolve() / 'mlflow.db'}")
    [stage] = client.search_runs(client.get_experiment_by_name("cluster").experiment_id,
                                 filter_string="tags.stage = 'train_teacher'")
    assert "CUDA is not available" in stage.data.params["trained_on"]
    # Every target's version is an MLflow model (ONNX on onnxruntime, StableHLO on torch-xla, the HLS emulation)
    versions = {d["target"]: client.get_model_version(d["model"], d["version"]) for d in result["registry"]}
    assert sorted(versions) == ["cpu", "fpga", "gpu", "tpu"]
    assert all("/models/m-" in v.source for v in versions.values()), {t: v.source for t, v in versions.items()}
