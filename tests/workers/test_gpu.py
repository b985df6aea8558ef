"""GPU target on a machine without a GPU: fp16 / int8 ONNX verified on onnxruntime's CPU provider, AOTInductor fp32
compiled with g++ and run on CPU; the runtime strings must name what ran, never TensorRT or CUDA."""
import json
import subprocess
import sys
import tarfile
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from vidopt.checkpoint import load_model_dir
from workers import gpu
from vidopt.onnx_utils import INT8_FORMS_DIR, int8_form_files, op_counts, ort_predict, ort_session, takes_pixels
from workers.common import batches, load_eval_clips, load_stored_clips, reference_logits
from workers.onnx_passes import to_fp16, to_tensorrt_int8

from .import_check import import_without


def _run(path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"clips": x})[0]


def test_module_imports_on_a_host_with_only_torch():
    # a GPU host brings its own torch and lacks the video, orchestration and ONNX libraries (seen on the lent H200)
    child = import_without("workers.gpu")
    assert child.returncode == 0 and child.stdout.strip() == "imported", child.stderr[-2000:]


def test_fp16_pass_keeps_fp32_io_and_close_logits(demo_job, tmp_path):
    fp16 = to_fp16(f"{demo_job.int8_dir}/model_fp32.onnx", tmp_path / "fp16.onnx")
    graph = onnx.load(str(fp16)).graph
    assert {i.data_type for i in graph.initializer if i.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)} \
        == {TensorProto.FLOAT16}
    assert graph.input[0].type.tensor_type.elem_type == graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    x, _ = load_eval_clips(demo_job)
    reference = reference_logits(demo_job, x)
    logits = _run(fp16, x.numpy())
    assert np.abs(logits - reference).max() <= gpu.FP16_REL_TOL * np.abs(reference).max()
    assert (logits.argmax(1) == reference.argmax(1)).all()


def test_tensorrt_int8_is_symmetric_and_keeps_the_quantizer_relu(demo_job, tmp_path):
    source = f"{demo_job.int8_dir}/model_int8.onnx"
    rewritten = to_tensorrt_int8(source, tmp_path / "trt.onnx")
    graph = onnx.load(str(rewritten)).graph
    inits = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero = inits[node.input[2]]
            assert zero.data_type == TensorProto.INT8 and not onnx.numpy_helper.to_array(zero).any(), node.name
    assert not [i.name for i in graph.initializer if i.data_type == TensorProto.INT32]  # biases folded to float
    # onnxruntime dropped the Relus (uint8 zero point 0 clamps); without them back, agreement fell to ~50%.
    assert sum(n.op_type == "Relu" for n in graph.node) >= 3
    # It reads uint8 pixels like its source; TensorRT gets them as float, then int8 from a Q/DQ of its own.
    assert takes_pixels(onnx.load(str(source))) and graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    readers = [n for n in graph.node if graph.input[0].name in n.input]
    assert [(n.op_type, n.attribute[0].i) for n in readers] == [("Cast", TensorProto.FLOAT)]
    stored, _ = load_stored_clips(demo_job)
    original = ort_predict(ort_session(source), batches(stored))
    symmetric = ort_predict(ort_session(rewritten), batches(stored))
    assert (original.argmax(1) == symmetric.argmax(1)).mean() >= 0.9


def test_tensorrt_int8_gets_whole_weights_from_a_compactly_stored_packed_body(demo_job, tmp_path):
    forms = int8_form_files(f"{demo_job.int8_dir}/{INT8_FORMS_DIR}")
    packed = next(path for name, path in forms.items() if "packed_body" in name)
    assert "Concat" in op_counts(packed)   # its block-diagonal weights stored as one block (onnx_utils)
    rewritten = to_tensorrt_int8(packed, tmp_path / "trt.onnx")
    ops = op_counts(rewritten)
    assert "Concat" not in ops and ops["Pad"] == 1   # left: the pixels' constant plane, not a weight
    graph = onnx.load(str(rewritten)).graph
    inits = {i.name for i in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    producer = {out: n for n in graph.node for out in n.output}
    assert all(producer[conv.input[1]].input[0] in inits for conv in convs)   # every weight a DQ of a constant
    stored, _ = load_stored_clips(demo_job)
    original = ort_predict(ort_session(packed), batches(stored))
    assert (original.argmax(1) == ort_predict(ort_session(rewritten), batches(stored)).argmax(1)).mean() >= 0.9


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallbacks; a GPU host runs the CUDA paths")
def test_gpu_target_on_cpu_names_what_ran(demo_job, tmp_path):
    job = demo_job.model_copy(update={"out_dir": str(tmp_path / "out")})
    started = time.monotonic()
    result = gpu.run_target(job)
    variants = result.extra["variants"]
    print(f"gpu run_target: {time.monotonic() - started:.1f} s; AOTInductor compile "
          f"{variants['aoti']['compile_s']:.1f} s; latency ms: "
          + ", ".join(f"{k}={v['latency_ms']:.3f}" for k, v in variants.items()))
    assert result.status == "ok", result.reason
    assert set(variants) == {"ort_fp16", "ort_int8", "ort_int8_symmetric", "aoti"}  # no TensorRT without CUDA
    assert result.runtime == variants["ort_int8"]["runtime"]  # int8 is the headline
    for name in ("ort_fp16", "ort_int8", "ort_int8_symmetric"):
        assert "CPUExecutionProvider" in variants[name]["runtime"]
        assert variants[name]["providers"] == ["CPUExecutionProvider"]
    assert all("TensorRT" not in v["runtime"] and "CUDA" not in v["runtime"] for v in variants.values())
    assert not any(v["on_gpu"] for v in variants.values())
    aoti = variants["aoti"]
    assert "AOTInductor float32 on CPU" in aoti["runtime"] and aoti["verified_in"] == "a fresh process"
    assert aoti["parity"]["max_abs_diff"] <= gpu.FP32_TOL and aoti["within_tolerance"]
    assert aoti["top1"] == result.top1 == variants["ort_fp16"]["top1"]
    assert result.parity["argmax_agreement"] >= 0.9 and result.top1 > 0.5  # 5 classes: chance is 0.2
    with tarfile.open(result.artifact_uri) as tar:
        names = {n.split("/")[-1] for n in tar.getnames()}
    assert {"student.pt2", "student_fp16.onnx", "student_int8.onnx", "student_int8_trt.onnx"} <= names
    # TensorRT's file comes from the form with no frames packed: the stem writes its 8 channels for one frame
    trt = onnx.load(str(tmp_path / "out" / "package" / "student_int8_trt.onnx")).graph
    stem = next(n for n in trt.node if n.op_type == "Conv")
    weights = {i.name: list(i.dims) for i in trt.initializer}
    assert weights[next(n for n in trt.node if n.output[0] == stem.input[1]).input[0]][0] == 8
    # runtime.json names the package's portable form, which its MLflow model runs (CUDA where there is one)
    from types import SimpleNamespace

    from vidopt.mlflow_onnx_model import OnnxClipClassifier
    from vidopt.onnx_utils import ort_predict, ort_session

    package = tmp_path / "out" / "package"
    runtime = json.loads((package / "runtime.json").read_text())
    assert runtime["file"] == "student_fp16.onnx" and runtime["providers"][-1] == "CPUExecutionProvider"
    stored, _ = load_stored_clips(job)
    classifier = OnnxClipClassifier()
    classifier.load_context(SimpleNamespace(artifacts={"package": str(package)}))
    np.testing.assert_allclose(classifier.predict(None, stored[:4].numpy()),
                               ort_predict(ort_session(package / runtime["file"]), [stored[:4]]), atol=1e-5)
    # The archived AOTInductor package runs on its own.
    runner = torch._inductor.aoti_load_package(str(tmp_path / "out" / "package" / "student.pt2"))
    x, _ = load_eval_clips(job)
    with torch.no_grad():
        np.testing.assert_allclose(runner(x[:3]).numpy(), reference_logits(job, x[:3]), atol=gpu.FP32_TOL)


def test_aoti_package_that_crashes_in_a_fresh_process_is_an_error(demo_job, tmp_path, monkeypatch):
    def crashing_child(package, clips, logits_out, threads):   # what the H200 showed: SIGSEGV in aoti_load_package
        crash = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
        return subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True)

    monkeypatch.setattr(gpu, "_run_aoti_child", crashing_child)
    x, labels = load_eval_clips(demo_job)
    model, _ = load_model_dir(demo_job.model_dir)
    record = gpu._guarded(lambda: gpu._aoti_variant(model, x, labels, reference_logits(demo_job, x), tmp_path, False, 1))
    assert "fresh process (exit -11, a segmentation fault)" in record["error"]
    assert gpu.headline_variant({"aoti": record}) is None


def test_headline_prefers_what_ran_on_the_gpu():
    cpu_int8, gpu_fp16 = {"on_gpu": False, "runtime": "ort cpu int8"}, {"on_gpu": True, "runtime": "aoti fp16 cuda"}
    # a GPU host without TensorRT (the lent H200): AOTInductor on the GPU, not onnxruntime int8 on the host's CPU
    assert gpu.headline_variant({"ort_int8": cpu_int8, "aoti": gpu_fp16}) is gpu_fp16
    trt_int8 = {"on_gpu": True, "runtime": "trt int8"}
    assert gpu.headline_variant({"aoti": gpu_fp16, "tensorrt_int8": trt_int8, "ort_int8": cpu_int8}) is trt_int8
    assert gpu.headline_variant({"ort_int8": cpu_int8, "aoti": {"error": "no compiler"}}) is cpu_int8
    assert gpu.headline_variant({"aoti": {"error": "no compiler"}}) is None


def test_missing_int8_model_is_reported_not_invented(demo_job, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "_aoti_variant", lambda *a: {"error": "not under test"})  # skip the slow compile
    job = demo_job.model_copy(update={"out_dir": str(tmp_path / "out"), "int8_dir": None})
    result = gpu.run_target(job)
    assert "ort_int8" not in result.extra["variants"]
    assert result.runtime == result.extra["variants"]["ort_fp16"]["runtime"]
