"""The export stage on a real local Ray with emulated pools: every target exports and verifies on its own runtime."""
import json
import time
from pathlib import Path

import pytest
import ray

from tasks import export


@pytest.fixture
def fresh_ray():
    ray.shutdown()  # other modules start their own Ray with other resources, and keep it for the process
    yield
    ray.shutdown()


@pytest.mark.integration
def test_all_targets_export_and_verify_concurrently(tiny_ladder, fresh_ray):
    cfg, stages = tiny_ladder
    started = time.monotonic()
    results = export.run(cfg, stages["dataset"], stages["int8"])
    wall = time.monotonic() - started
    by_target = {r.target: r for r in results}
    assert list(by_target) == ["cpu", "gpu", "tpu", "fpga"]
    for target, result in by_target.items():
        assert result.status == "ok", (target, result.reason)
        assert Path(result.artifact_uri).is_file() and result.artifact_bytes > 0
        assert result.runtime and "TensorRT" not in result.runtime and "CUDA" not in result.runtime
    assert by_target["cpu"].parity["argmax_agreement"] >= 0.9
    runtime = json.loads((Path(by_target["cpu"].artifact_uri).parent / "cpu_int8" / "runtime.json").read_text())
    assert runtime["input"]["dtype"] == "uint8"                                        # what the int8 file reads
    assert runtime["input"]["layout"].startswith("[B, 3, T, H, W] uint8 RGB pixels")
    assert by_target["tpu"].parity["max_abs_diff"] <= 1e-4
    assert by_target["fpga"].parity["argmax_agreement"] >= 0.9
    saved = json.loads((Path(by_target["cpu"].artifact_uri).parents[1] / "results.json").read_text())
    assert [r["target"] for r in saved["results"]] == list(by_target)
    # Concurrent pools: the stage takes less than the targets' times added up.
    assert wall < sum(r.seconds for r in results)


def test_target_without_pool_is_skipped_fast(tiny_ladder, fresh_ray):
    cfg, stages = tiny_ladder
    cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"emulate": ["gpu"]}),
                                 "export": cfg.export.model_copy(update={"targets": ["fpga", "cpu"]})})
    started = time.monotonic()
    results = export.run(cfg, stages["dataset"], stages["int8"])
    assert [(r.target, r.status) for r in results] == [("fpga", "skipped"), ("cpu", "ok")]
    assert "FPGA" in results[0].reason
    assert time.monotonic() - started < 60
