"""TPU target on PJRT CPU: StableHLO exported in one child process, reloaded and run in another, compared here."""
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

import pytest
import torch

from tests.workers.conftest import for_target
from workers import tpu

from .import_check import import_without

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="torch-xla wheels are Linux-only")


def test_module_imports_without_torch_xla():
    child = import_without("workers.tpu")
    assert child.returncode == 0 and child.stdout.strip() == "imported", child.stderr[-2000:]


def test_missing_torch_xla_skips(demo_job, tmp_path, monkeypatch):
    monkeypatch.setattr(tpu.importlib.util, "find_spec", lambda name: None)
    result = tpu.run_target(for_target(demo_job, "tpu", out_dir=str(tmp_path)))
    assert result.status == "skipped" and "torch_xla" in result.reason


@pytest.mark.skipif(importlib.util.find_spec("torch_xla") is None, reason="torch-xla is not installed")
def test_stablehlo_reloaded_in_a_fresh_process_matches_pytorch(demo_job, tmp_path):
    saved = torch.load(demo_job.eval_clips, weights_only=True)
    # Each StableHLOGraphModule call recompiles (~1 s on CPU), so 6 clips and 3 timed calls keep this test short.
    torch.save({k: v[:6] for k, v in saved.items()}, tmp_path / "eval6.pt")
    job = for_target(demo_job, "tpu", {"bf16": True, "latency_iters": 3, "pjrt_device": "CPU"},
                     eval_clips=str(tmp_path / "eval6.pt"), out_dir=str(tmp_path / "out"))
    xla_already_imported = "torch_xla" in sys.modules   # by another test in this pytest process, perhaps
    started = time.monotonic()
    result = tpu.run_target(job)
    print(f"tpu run_target: {time.monotonic() - started:.1f} s; " + "; ".join(
        f"{k}: diff {v['parity']['max_abs_diff']:.2e}, {v['latency_ms']:.2f} ms (+{v['compile_ms']:.0f} ms compile "
        f"per call)" for k, v in result.extra.get("variants", {}).items()))
    assert result.status == "ok", result.reason
    assert result.parity["max_abs_diff"] <= tpu.FP32_TOL
    assert result.runtime.startswith("torch-xla ") and result.runtime.endswith("StableHLO on PJRT CPU")
    assert xla_already_imported or "torch_xla" not in sys.modules  # export and verification ran in children
    assert result.top1 > 0.5 and result.latency_ms > 0
    bf16 = result.extra["variants"]["bf16"]
    assert bf16["runtime"] == result.runtime
    assert 0 < bf16["parity"]["max_abs_diff"] < 1.0  # really bf16 (not fp32 again), and still close
    assert bf16["parity"]["argmax_agreement"] >= 0.8
    with tarfile.open(result.artifact_uri) as tar:
        names = tar.getnames()
    assert any(n.endswith(".bytecode") for n in names) and any("/data/" in n for n in names)
    assert "stablehlo/signature.json" in names
    assert result.extra["variants"]["fp32"]["shipped_batch1_parity"]["clips"] == 3  # one clip per timed call
    # The shipped program as an MLflow model (vidopt/mlflow_stablehlo_model.py), run in a fresh process as a server
    # would: the first clips' logits are the shipped program's own.
    program = tmp_path / "out" / "stablehlo"
    assert json.loads((program / "signature.json").read_text())["input"]["normalise"]["mean"][0] == 0.43216
    script = ("import json, sys, types, torch; from vidopt.mlflow_stablehlo_model import StableHloClipClassifier as C; "
              "m = C(); m.load_context(types.SimpleNamespace(artifacts={'program': sys.argv[1]})); "
              "clips = torch.load(sys.argv[2], weights_only=True)['clips'][:2].numpy(); "
              "print(json.dumps(m.predict(None, clips).tolist()))")
    child = subprocess.run([sys.executable, "-c", script, str(program), str(tmp_path / "eval6.pt")],
                           capture_output=True, text=True, timeout=300, cwd=REPO,
                           env={**os.environ, "PJRT_DEVICE": "CPU"})
    assert child.returncode == 0, child.stderr[-3000:]
    shipped = np.load(tmp_path / "out" / "verify" / "stablehlo_shipped.npy")[:2]
    assert np.abs(np.array(json.loads(child.stdout.strip().splitlines()[-1])) - shipped).max() <= 1e-4


def test_verification_batches_are_as_few_and_as_even_as_the_cap_allows():
    assert [tpu.verify_batch(n) for n in (1, 6, 64, 65, 88, 130)] == [1, 6, 64, 33, 44, 44]
