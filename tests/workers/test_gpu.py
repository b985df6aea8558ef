"""GPU target on a machine without a GPU: fp16 / int8 ONNX verified on onnxruntime's CPU provider, AOTInductor fp32
compiled with g++ and run on CPU; the runtime strings must name what ran, never TensorRT or CUDA."""
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

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


@pytest.fixture(scope="module")
def gpu_run(demo_job, tmp_path_factory):
    """The GPU target run once on the demo job (AOTInductor's compile takes most of a minute): (job, result)."""
    job = demo_job.model_copy(update={"out_dir": str(tmp_path_factory.mktemp("gpu") / "out")})
    started = time.monotonic()
    result = gpu.run_target(job)
    result.extra["seconds_here"] = time.monotonic() - started
    return job, result


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallbacks; a GPU host runs the CUDA paths")
def test_gpu_target_on_cpu_names_what_ran(gpu_run):
    job, result = gpu_run
    variants = result.extra["variants"]
    print(f"gpu run_target: {result.extra['seconds_here']:.1f} s; AOTInductor compile "
          f"{variants['aoti']['compile_s']:.1f} s; latency ms: "
          + ", ".join(f"{k}={v['latency_ms']:.3f}" for k, v in variants.items()))
    assert result.status == "ok", result.reason
    assert set(variants) == {"ort_fp16", "ort_int8", "ort_int8_symmetric", "aoti"}  # no TensorRT without CUDA
    for name in ("ort_fp16", "ort_int8", "ort_int8_symmetric"):
        assert "CPUExecutionProvider" in variants[name]["runtime"]
        assert variants[name]["providers"] == ["CPUExecutionProvider"]
    assert all("TensorRT" not in v["runtime"] and "CUDA" not in v["runtime"] for v in variants.values())
    assert not any(v["on_gpu"] for v in variants.values())
    aoti = variants["aoti"]
    assert "AOTInductor float32 on CPU" in aoti["runtime"] and aoti["verified_in"] == "a fresh process"
    assert aoti["parity"]["max_abs_diff"] <= gpu.FP32_TOL and aoti["within_tolerance"]
    assert aoti["top1"] == variants["ort_fp16"]["top1"]
    # the package serves the fastest variant that agrees with the reference within the budget, and says so
    budget = job.options.min_argmax_agreement
    faithful = [n for n in gpu.SERVED if variants[n]["parity"]["argmax_agreement"] >= budget]
    assert sorted(result.extra["faithful"]) == sorted(faithful) and faithful
    shipped = result.extra["shipped"]
    assert shipped == min(faithful, key=lambda n: variants[n]["latency_ms"])
    assert (result.runtime, result.latency_ms, result.top1) == tuple(variants[shipped][k] for k in
                                                                      ("runtime", "latency_ms", "top1"))
    assert result.parity["argmax_agreement"] >= 0.9 and result.top1 > 0.5  # 5 classes: chance is 0.2
    package = Path(job.out_dir) / "package"
    runtime = json.loads((package / "runtime.json").read_text())
    assert runtime["file"] == variants[shipped]["file"] and runtime["precision"] == variants[shipped]["precision"]
    with tarfile.open(result.artifact_uri) as tar:
        names = {n.split("/")[-1] for n in tar.getnames()}
    assert {"student.pt2", "student_fp16.onnx", "student_int8.onnx", "student_int8_trt.onnx"} <= names
    # TensorRT's file comes from the form with no frames packed: the stem writes its 8 channels for one frame
    trt = onnx.load(str(package / "student_int8_trt.onnx")).graph
    stem = next(n for n in trt.node if n.op_type == "Conv")
    weights = {i.name: list(i.dims) for i in trt.initializer}
    assert weights[next(n for n in trt.node if n.output[0] == stem.input[1]).input[0]][0] == 8
    # Whichever variant ships, the package's MLflow model runs it as verified: each servable kind, through its
    # runtime.json, reproduces what the target measured
    from types import SimpleNamespace

    from vidopt.mlflow_aoti_model import AotiClipClassifier
    from vidopt.mlflow_onnx_model import OnnxClipClassifier

    stored, _ = load_stored_clips(job)
    x, _ = load_eval_clips(job)
    for name, model in (("ort_int8", OnnxClipClassifier()), ("ort_fp16", OnnxClipClassifier()),
                        ("aoti", AotiClipClassifier())):
        (package / "runtime.json").write_text(json.dumps(gpu.shipped_runtime_json(
            name, variants[name], package, 1, list(x.shape[1:]), None)))
        model.load_context(SimpleNamespace(artifacts={"package": str(package)}))
        logits = model.predict(None, stored[:4].numpy())
        if name == "aoti":
            np.testing.assert_allclose(logits, reference_logits(job, x[:4]), atol=gpu.FP32_TOL)
        else:
            expected = ort_predict(ort_session(package / variants[name]["file"]), [stored[:4]])
            np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_a_package_serving_aotinductor_is_an_mlflow_model_and_runs_in_predict(gpu_run, tmp_path):
    """A GPU package whose runtime.json names the AOTInductor program: logged from its archive as the export stage
    does, loaded back from a real MLflow store, and opened by `vidopt predict` / `evaluate`, each reproduces the
    PyTorch reference on contiguous clips (a program compiled for other strides gave wrong logits)."""
    import mlflow

    from tasks.evaluate import EvaluateError, open_model, package_predictor
    from tasks.export import log_pyfunc_model
    from workers.common import archive

    job, result = gpu_run
    package = tmp_path / "package"
    shutil.copytree(Path(job.out_dir) / "package", package)
    x, _ = load_eval_clips(job)
    (package / "runtime.json").write_text(json.dumps(gpu.shipped_runtime_json(
        "aoti", result.extra["variants"]["aoti"], package, 1, list(x.shape[1:]), ["a", "b", "c", "d", "e"])))
    packed = archive(package, tmp_path / "gpu_package.tar.gz")
    stored, _ = load_stored_clips(job)
    expected = reference_logits(job, x[:5])
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        experiment = mlflow.create_experiment("gpu", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            info = log_pyfunc_model(packed)
        model = mlflow.pyfunc.load_model(info.model_uri)
        requirements = Path(mlflow.pyfunc.get_model_dependencies(info.model_uri)).read_text().split()
    finally:
        mlflow.set_tracking_uri(previous)
    np.testing.assert_allclose(model.predict(stored[:5].numpy()), expected, atol=gpu.FP32_TOL)
    assert any(r.startswith("torch==") for r in requirements) and not any("onnxruntime" in r for r in requirements)
    kind, source, classes, clip = open_model(packed, tmp_path / "scratch")
    assert (kind, classes, clip) == ("aotinductor", ["a", "b", "c", "d", "e"], tuple(stored.shape[1:4]))
    np.testing.assert_allclose(package_predictor(kind, source)([stored[:2], stored[2:5]]), expected, atol=gpu.FP32_TOL)
    if not torch.cuda.is_available():   # a program compiled for CUDA, opened where there is none: one clear error
        described = json.loads((source.parent / "runtime.json").read_text())
        (source.parent / "runtime.json").write_text(json.dumps({**described, "device": "cuda", "dtype": "float16"}))
        with pytest.raises(EvaluateError, match="student.pt2 was compiled for CUDA and this host has no GPU"):
            package_predictor(kind, source)


def test_aoti_package_that_crashes_in_a_fresh_process_is_an_error(demo_job, tmp_path, monkeypatch):
    def crashing_child(package, clips, logits_out, threads):   # what the H200 showed: SIGSEGV in aoti_load_package
        crash = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
        return subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True)

    def no_compile(program, package_path):   # the compile is not under test here (~10 s of g++)
        Path(package_path).write_bytes(b"a package that will not load")
        return package_path

    monkeypatch.setattr(gpu, "_run_aoti_child", crashing_child)
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compile)
    x, labels = load_eval_clips(demo_job)
    model, _ = load_model_dir(demo_job.model_dir)
    reference = reference_logits(demo_job, x)
    record = gpu._guarded(lambda: gpu._aoti_variant(model, x, labels, reference, tmp_path, False, 1))
    assert "fresh process (exit -11, a segmentation fault)" in record["error"]
    assert gpu.choose_shipped({"aoti": record}, 0.0) is None


def _ran(latency_ms: float, on_gpu: bool, agreement: float = 1.0, gated: bool = False, within: bool = True) -> dict:
    return {"latency_ms": latency_ms, "on_gpu": on_gpu, "parity": {"argmax_agreement": agreement}, "gated": gated,
            "within_tolerance": within, "runtime": "r"}


def test_the_fastest_faithful_servable_variant_on_the_gpu_ships():
    # a GPU host without TensorRT and with onnxruntime's CPU build (the lent H200): AOTInductor on the GPU ships,
    # not the faster onnxruntime int8 on the host's CPU
    choice = gpu.choose_shipped({"ort_int8": _ran(0.1, False), "aoti": _ran(0.5, True)}, 0.99)
    assert choice == {"shipped": "aoti", "fastest": "aoti", "faithful": ["aoti"]}
    # everything on the GPU: the fastest servable ships; a faster TensorRT engine is named, not served
    variants = {"tensorrt_int8": _ran(0.1, True), "ort_fp16": _ran(0.4, True), "ort_int8": _ran(0.2, True),
                "aoti": _ran(0.3, True)}
    assert gpu.choose_shipped(variants, 0.99) == {"shipped": "ort_int8", "fastest": "tensorrt_int8",
                                                  "faithful": ["ort_fp16", "ort_int8", "aoti"]}
    # below the agreement budget, or outside a gated parity: not shipped however fast
    variants |= {"ort_int8": _ran(0.2, True, agreement=0.95), "aoti": _ran(0.25, True, gated=True, within=False)}
    assert gpu.choose_shipped(variants, 0.99)["shipped"] == "ort_fp16"
    # nothing faithful: the most faithful ships (the registry's gate says why it is not promoted)
    unfaithful = {"ort_int8": _ran(0.2, True, agreement=0.9), "ort_fp16": _ran(0.4, True, agreement=0.95)}
    assert gpu.choose_shipped(unfaithful, 0.99) == {"shipped": "ort_fp16", "fastest": "ort_fp16", "faithful": []}
    assert gpu.choose_shipped({"ort_int8": _ran(0.2, False), "aoti": {"error": "no compiler"}}, 0.0)["shipped"] == \
        "ort_int8"
    assert gpu.choose_shipped({"aoti": {"error": "no compiler"}}, 0.0) is None


def test_missing_int8_model_is_reported_not_invented(demo_job, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "_aoti_variant", lambda *a: {"error": "not under test"})  # skip the slow compile
    job = demo_job.model_copy(update={"out_dir": str(tmp_path / "out"), "int8_dir": None})
    result = gpu.run_target(job)
    assert "ort_int8" not in result.extra["variants"]
    assert result.runtime == result.extra["variants"]["ort_fp16"]["runtime"]
