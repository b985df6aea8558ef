"""GPU target: fp16 and int8 ONNX for onnxruntime (CUDA) and TensorRT, and an AOTInductor package, each verified on
what really runs here; the package serves the fastest that is faithful.

    python -m workers.gpu JOB.json        # run one export job (see vidopt.artifacts.LocalExportJob), print its result
    python -m workers.gpu --demo DIR      # build a tiny trained student + clips + int8 ONNX in DIR and run on them
    python -m workers.gpu --run-aoti PACKAGE CLIPS LOGITS_OUT THREADS   # (child) load a .pt2 fresh, run, time it

TensorRT engines are built and timed only where `tensorrt` imports and CUDA works; otherwise the ONNX files are run
with onnxruntime (CUDA provider if present, else CPU) and the runtime string names the provider that ran. Of the
variants the package's MLflow model can serve (SERVED: the ONNX files on onnxruntime, the AOTInductor package), those
that ran on the GPU (on the host CPU only where none did) and agree with the fp32 reference within
`min_argmax_agreement` compete, and the fastest at batch 1 ships: runtime.json names it (choose_shipped). TensorRT
engines are timed beside them and the result names the fastest of all, but an engine is tied to one GPU model and
TensorRT version, so none is served. Heavy or optional libraries (onnxruntime, onnx, tensorrt) are imported inside
the functions that need them, so this module imports on a GPU host that has torch and vidopt's light dependencies
(pydantic, numpy, safetensors, pyyaml) only.
"""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from vidopt.artifacts import LocalExportJob, TargetResult, default_options
from vidopt.checkpoint import load_model_dir
from vidopt.data import normalise_clips
from vidopt.timing import time_calls
from workers.common import (Truth, archive, batches, correct, load_stored_clips, model_classes, onnx_runtime_json,
                            parity, reference_logits, run_module, top1)

FP32_TOL = 1e-4           # max |logit| difference allowed for fp32 back-ends
FP16_REL_TOL = 1e-2       # fp16 keeps 11 mantissa bits; max |diff| against max |logit|, reported (not gated)
MAX_BATCH = 64            # dynamic batch range of the AOTInductor package and the TensorRT profile
LATENCY_WARMUP, LATENCY_ITERS = 5, 30
AOTI_CHILD_TIMEOUT_S = 600    # load + run every eval clip + time batch 1; seconds on a CPU, far less on a GPU
# What the package's MLflow model runs (vidopt/mlflow_onnx_model.py, vidopt/mlflow_aoti_model.py), by variant name
SERVED = ("ort_int8", "ort_fp16", "ort_int8_symmetric", "aoti")


def run_target(job: LocalExportJob) -> TargetResult:
    started = time.monotonic()
    package = Path(job.out_dir) / "package"     # everything deployable; archived as a whole
    package.mkdir(parents=True, exist_ok=True)
    stored, truth = load_stored_clips(job)      # [N, T, H, W, C] uint8: ONNX files are fed through ort_predict
    # [N, C, T, H, W] float, for PyTorch and AOTInductor; contiguous, as a server's clips are: AOTInductor compiles
    # for the example's strides and gave wrong logits on other ones (normalise_clips keeps [N, T, H, W, C] strides)
    x = normalise_clips(stored).contiguous()
    reference = reference_logits(job, x)
    model, _ = load_model_dir(job.model_dir)
    threads = job.options.threads
    cuda = torch.cuda.is_available()

    variants: dict[str, dict] = {}
    onnx_files = _guarded(lambda: _onnx_files(job, model, tuple(x.shape[1:]), package))
    if "error" in onnx_files:
        variants["onnx_export"], onnx_files = onnx_files, {}
    if job.int8_dir and "int8" not in onnx_files and "onnx_export" not in variants:
        variants["ort_int8"] = {"error": f"{job.int8_dir}/model_int8.onnx: not found (run the quantize stage)"}
    for name, path in onnx_files.items():
        precision = "fp16" if name == "fp16" else "int8"
        variants[f"ort_{name}"] = _guarded(lambda: _ort_variant(path, stored, truth, reference, threads, precision))
    if _tensorrt_usable(cuda):
        for precision, source in (("fp16", onnx_files.get("fp16")), ("int8", onnx_files.get("int8_symmetric"))):
            if source:
                variants[f"tensorrt_{precision}"] = _guarded(
                    lambda: _tensorrt_variant(source, stored, truth, reference, precision))
    variants["aoti"] = _guarded(lambda: _aoti_variant(model, x, truth, reference, package, cuda, threads))
    problems = [f"{k}: {v['error']}" if "error" in v else f"{k}: parity {v['parity']} outside {v['tolerance']}"
                for k, v in variants.items() if "error" in v or (v.get("gated") and not v["within_tolerance"])]
    choice = choose_shipped(variants, job.options.min_argmax_agreement)
    if choice is not None:
        shipped = variants[choice["shipped"]]
        (package / "runtime.json").write_text(json.dumps(
            shipped_runtime_json(choice["shipped"], shipped, package, threads, list(x.shape[1:]), model_classes(job)),
            indent=2))
    artifact = archive(package, Path(job.out_dir) / "gpu_package.tar.gz")
    common = dict(target="gpu", artifact_uri=str(artifact), artifact_bytes=artifact.stat().st_size,
                  seconds=time.monotonic() - started,
                  extra={"variants": variants, "cuda": cuda, **(choice or {}),
                         "min_argmax_agreement": job.options.min_argmax_agreement})
    if choice is None:
        return TargetResult(status="failed", reason="; ".join(problems) or "no variant ran", **common)
    return TargetResult(status="failed" if problems else "ok", reason="; ".join(problems)[:2000],
                        runtime=shipped["runtime"], parity=shipped["parity"], top1=shipped["top1"],
                        correct=shipped.get("correct", ""), latency_ms=shipped["latency_ms"], **common)


def choose_shipped(variants: dict[str, dict], min_agreement: float) -> dict | None:
    """The variant the package serves -> {"shipped": name, "fastest": name, "faithful": [names]}, or None when no
    servable variant ran. Those that ran on the GPU compete (on the host CPU only where none did): of the SERVED ones
    whose argmax agreement with the fp32 reference is within `min_agreement` (and, where gated, whose parity is), the
    fastest at batch 1; where none is faithful, the most faithful (the registry's gate then says why it is not
    promoted). "fastest" is the fastest faithful variant of all, TensorRT engines included."""
    ran = {name: v for name, v in variants.items() if "error" not in v}
    pool = {name: v for name, v in ran.items() if v["on_gpu"]} or ran
    servable = ({name: v for name, v in pool.items() if name in SERVED}
                or {name: v for name, v in ran.items() if name in SERVED})
    if not servable:
        return None

    def faithful(v: dict) -> bool:
        return v["parity"]["argmax_agreement"] >= min_agreement and (not v.get("gated") or v["within_tolerance"])

    def latency(name: str) -> float:
        return ran[name]["latency_ms"]

    ok = [name for name, v in servable.items() if faithful(v)]
    shipped = (min(ok, key=latency) if ok
               else max(servable, key=lambda name: servable[name]["parity"]["argmax_agreement"]))
    fastest = min([name for name, v in {**pool, **servable}.items() if faithful(v)], key=latency, default=shipped)
    return {"shipped": shipped, "fastest": fastest, "faithful": ok}


def shipped_runtime_json(name: str, record: dict, package: Path, threads: int, shape: list[int],
                         classes: list[str] | None) -> dict:
    """runtime.json of the package's served variant: an ONNX file on onnxruntime (CUDA where the serving host has it,
    else its CPU), or the AOTInductor package on the device and dtype it was compiled for."""
    if name == "aoti":
        device, dtype = ("cuda", "float16") if record["on_gpu"] else ("cpu", "float32")
        return onnx_runtime_json(record["file"], [], threads, shape, False, classes, runtime="aotinductor",
                                 runtime_version=f"torch {torch.__version__}", device=device, dtype=dtype,
                                 precision=record["precision"])
    import onnx

    from vidopt.onnx_utils import takes_pixels

    pixels = takes_pixels(onnx.load(str(package / record["file"]), load_external_data=False))
    return onnx_runtime_json(record["file"], ["CUDAExecutionProvider", "CPUExecutionProvider"], threads, shape, pixels,
                             classes, runtime="onnxruntime", runtime_version=record["runtime"],
                             precision=record["precision"])


def _guarded(make: Callable[[], dict]) -> dict:
    """Run one variant now; a failure becomes its record (the exception) instead of stopping the others."""
    try:
        return make()
    except Exception as error:  # noqa: BLE001 - every back-end raises its own types; the message is what matters
        return {"error": f"{type(error).__name__}: {error}"[:1500], "trace": traceback.format_exc()[-3000:]}


def _score(logits: np.ndarray, reference: np.ndarray, truth: Truth, precision: str) -> dict:
    """Parity against the fp32 PyTorch logits, top-1, and the bar for this precision (int8: argmax agreement only;
    its accuracy is gated by the quantize stage against the test split)."""
    check = parity(logits, reference)
    scale = max(float(np.abs(reference).max()), 1e-12)
    result = {"parity": check, "top1": top1(logits, truth), "correct": correct(logits, truth),
              "rel_max_abs_diff": check["max_abs_diff"] / scale}
    if precision == "fp32":
        result |= {"within_tolerance": check["max_abs_diff"] <= FP32_TOL, "tolerance": f"{FP32_TOL} abs", "gated": True}
    elif precision == "fp16":
        result |= {"within_tolerance": result["rel_max_abs_diff"] <= FP16_REL_TOL, "gated": False,
                   "tolerance": f"{FP16_REL_TOL} * max|logit| (reported, not gated)"}
    else:
        result |= {"tolerance": "none (argmax agreement reported; quantize stage gates int8 accuracy)", "gated": False}
    return result


def _p50_ms(call: Callable[[], object], sync: Callable[[], None] = lambda: None) -> float:
    """Batch-1 p50 by the shared protocol (vidopt/timing.py), each call timed until its result exists (`sync`: CUDA
    launches are asynchronous)."""
    return time_calls(lambda: (call(), sync()), 1, LATENCY_WARMUP, LATENCY_ITERS)["p50_ms"]


# ---- (a) ONNX: fp16 and int8 for TensorRT, verified with onnxruntime -----------------------------------------------

def _onnx_files(job: LocalExportJob, model, input_shape: tuple, package: Path) -> dict[str, Path]:
    """fp16: the fp32 export with every float weight and activation cast to fp16 (fp32 input/output kept);
    int8: the quantize stage's QDQ model as is (onnxruntime CPU's uint8-activation flavour), and its form with the
    fewest multiply-adds rewritten with symmetric int8 activations, the only kind TensorRT accepts."""
    from vidopt.onnx_utils import INT8_FORMS_DIR, export_onnx, fewest_macs_int8_form
    from workers.onnx_passes import to_fp16, to_tensorrt_int8

    # fp32 is only the fp16 file's source: the quantize stage's export of these very weights when the job has one
    # (its parity with PyTorch was checked there), else a fresh export (~4 s of CPU)
    fp32 = Path(job.int8_dir or "") / "model_fp32.onnx"
    with tempfile.TemporaryDirectory(prefix="vidopt-gpu-") as work:
        if not (job.int8_dir and fp32.exists()):
            fp32 = export_onnx(model, input_shape, Path(work) / "fp32.onnx")
        files = {"fp16": to_fp16(fp32, package / "student_fp16.onnx")}
    source = Path(job.int8_dir or "") / "model_int8.onnx"
    if job.int8_dir and source.exists():
        files["int8"] = Path(shutil.copy2(source, package / "student_int8.onnx"))
        # TensorRT's from the form with the fewest multiply-adds; the file the quantize stage kept is the fastest on
        # onnxruntime's CPU int8 kernels (frames packed into its convs: on the demo's student, the symmetric file of
        # that form ran 11 ms on onnxruntime CPU against 2.9 for the stem-only packing)
        forms = Path(job.int8_dir) / INT8_FORMS_DIR
        files["int8_symmetric"] = to_tensorrt_int8(fewest_macs_int8_form(forms) if forms.exists() else source,
                                                   package / "student_int8_trt.onnx")
    return files


def _ort_variant(path: Path, stored, truth, reference, threads: int, precision: str) -> dict:
    """`stored`: the eval clips as stored, uint8 [N, T, H, W, C]; ort_predict gives each file the input it reads."""
    import onnxruntime as ort

    from vidopt.onnx_utils import INPUT_NAME, measure_latency, model_input, ort_predict, ort_session, takes_pixels

    if "CUDAExecutionProvider" in ort.get_available_providers():
        session = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    else:
        session = ort_session(path, threads)
    providers = session.get_providers()   # what onnxruntime registered, not what we asked for
    logits = ort_predict(session, batches(stored))
    first = model_input(stored[:1], takes_pixels(session))   # [1, C, T, H, W] as this file reads it
    if providers[0] == "CPUExecutionProvider":
        latency = measure_latency(path, first.shape[1:], batch=1, threads=threads)["p50_ms"]
        runtime = f"onnxruntime {ort.__version__} CPUExecutionProvider ({threads} thread(s))"
    else:
        latency = _p50_ms(lambda: session.run(None, {INPUT_NAME: first}))
        runtime = f"onnxruntime {ort.__version__} {providers[0]}"
    result = {"runtime": runtime, "providers": providers, "on_gpu": providers[0] != "CPUExecutionProvider",
              "latency_ms": latency, "file": path.name, "bytes": path.stat().st_size,
              "precision": precision}
    if precision == "fp16" and providers[0] == "CPUExecutionProvider":
        result["note"] = ("onnxruntime's CPU provider has no x86 fp16 kernels for these ops and inserts Casts so they "
                          "run in fp32: this checks fp16 rounding of the weights, not fp16 arithmetic or speed")
    return result | _score(logits, reference, truth, "fp16" if precision == "fp16" else "int8")


def _tensorrt_usable(cuda: bool) -> bool:
    if not cuda:
        return False
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def _tensorrt_variant(onnx_path: Path, stored, truth, reference, precision: str) -> dict:
    """Build a TensorRT engine from the ONNX file and run it on CUDA tensors. The files carry their precision (fp16
    tensors; int8 Q/DQ), so the network is strongly typed and TensorRT builds exactly that: no FP16/INT8 builder flags
    (weak typing is deprecated since TensorRT 10.12 and removed in 11). `stored`: uint8 clips [N, T, H, W, C], given
    to the engine as the file reads them (model_input: pixels for the int8 file, normalised floats for fp16)."""
    import onnx
    import tensorrt as trt

    from vidopt.onnx_utils import INPUT_NAME, OUTPUT_NAME, model_input, takes_pixels

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # 11.x: always, no flag
    network = builder.create_network(0 if strongly_typed is None else 1 << int(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        raise RuntimeError("; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    config = builder.create_builder_config()
    pixels = takes_pixels(onnx.load(str(onnx_path)))
    shape = model_input(stored[:1], pixels).shape[1:]   # [C, T, H, W]
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (1, *shape), (1, *shape), (MAX_BATCH, *shape))
    config.add_optimization_profile(profile)
    started = time.monotonic()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build an engine from {onnx_path.name} (see the TensorRT log)")
    build_s = time.monotonic() - started
    engine_path = onnx_path.with_suffix(".engine")
    engine_path.write_bytes(bytes(serialized))
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    context = engine.create_execution_context()
    stream = torch.cuda.current_stream()

    def infer(clips: torch.Tensor) -> torch.Tensor:
        batch = torch.from_numpy(model_input(clips, pixels)).cuda().contiguous()
        context.set_input_shape(INPUT_NAME, tuple(batch.shape))
        out = torch.empty(tuple(context.get_tensor_shape(OUTPUT_NAME)), device="cuda", dtype=torch.float32)
        context.set_tensor_address(INPUT_NAME, batch.data_ptr())
        context.set_tensor_address(OUTPUT_NAME, out.data_ptr())
        context.execute_async_v3(stream.cuda_stream)
        return out

    logits = np.concatenate([infer(b).cpu().numpy() for b in batches(stored)])
    first = stored[:1]
    return {"runtime": f"TensorRT {trt.__version__} {precision} on {torch.cuda.get_device_name()}", "on_gpu": True,
            "latency_ms": _p50_ms(lambda: infer(first), torch.cuda.synchronize), "build_s": build_s,
            "precision": precision,
            "file": engine_path.name, "bytes": engine_path.stat().st_size} | _score(logits, reference, truth,
                                                                                     precision)


# ---- (b) AOTInductor -------------------------------------------------------------------------------------------------

def _aoti_variant(model, x, truth, reference, package: Path, cuda: bool, threads: int) -> dict:
    """torch.export -> AOTInductor package (a .pt2 holding the compiled .so and weights), then loaded and run in a
    fresh process, as a server would: on the lent H200 (torch 2.11+cu130) a package that ran in the process that built
    it crashed when loaded in a new one. fp16 on CUDA (what a GPU server would run), fp32 on CPU (the C++ compile is
    done by the host's g++). On CPU the generated kernels bake in the OpenMP thread count at compile time, so compile
    and run at the job's `threads`, like the onnxruntime sessions."""
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    saved_threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(threads)
    try:
        module = copy.deepcopy(model).to(device, dtype).eval()
        example = torch.cat([x[:1]] * 2).to(device, dtype)  # batch 2: torch.export turns a size-1 dim into a constant
        started = time.monotonic()
        with torch.no_grad():
            program = torch.export.export(module, (example,),
                                          dynamic_shapes=({0: torch.export.Dim("batch", max=MAX_BATCH)},))
        export_s = time.monotonic() - started
        path = Path(torch._inductor.aoti_compile_and_package(program, package_path=str(package / "student.pt2")))
        compile_s = time.monotonic() - started - export_s
    finally:
        torch.set_num_threads(saved_threads)
    with tempfile.TemporaryDirectory(prefix="vidopt-aoti-") as work:
        clips, logits_file = Path(work) / "clips.pt", Path(work) / "logits.npy"
        torch.save(x, clips)                                  # normalised [N, C, T, H, W] float32
        child = _run_aoti_child(path, clips, logits_file, threads)
        if child.returncode:
            raise RuntimeError(f"the AOTInductor package failed when loaded and run in a fresh process "
                               f"(exit {child.returncode}{', a segmentation fault' if child.returncode == -11 else ''})"
                               f": {(child.stderr or child.stdout).strip()[-800:]}")
        logits, latency = np.load(logits_file), json.loads(child.stdout.strip().splitlines()[-1])["latency_ms"]
    where = torch.cuda.get_device_name() if cuda else f"CPU ({threads} thread(s))"
    return {"runtime": f"torch {torch.__version__} AOTInductor {str(dtype).removeprefix('torch.')} on {where}",
            "on_gpu": cuda, "latency_ms": latency, "export_s": export_s, "compile_s": compile_s,
            "verified_in": "a fresh process", "file": path.name, "bytes": path.stat().st_size,
            "precision": "fp16" if cuda else "fp32"} \
        | _score(logits, reference, truth, "fp16" if cuda else "fp32")


def _run_aoti_child(package: Path, clips: Path, logits_out: Path, threads: int) -> subprocess.CompletedProcess:
    return run_module("workers.gpu", ["--run-aoti", str(package), str(clips), str(logits_out), str(threads)],
                      AOTI_CHILD_TIMEOUT_S)


def run_aoti_package(package: str, clips_file: str, logits_out: str, threads: int) -> dict:
    """Child process: load the package, run every clip, time batch 1. Writes logits [N, classes] float32 to
    `logits_out`; returns the latency. Device and dtype as the parent compiled for: fp16 on CUDA where this host has
    it, else fp32 on CPU."""
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    if not cuda:
        torch.set_num_threads(threads)
    runner = torch._inductor.aoti_load_package(package)
    x = torch.load(clips_file, weights_only=True)
    with torch.no_grad():
        logits = np.concatenate([runner(b.to(device, dtype).contiguous()).float().cpu().numpy() for b in batches(x)])
        first = x[:1].to(device, dtype).contiguous()
        latency = _p50_ms(lambda: runner(first), torch.cuda.synchronize if cuda else lambda: None)
    np.save(logits_out, logits.astype(np.float32))
    return {"latency_ms": latency}


# ---- a tiny job to try this module on any machine ---------------------------------------------------------------------

def make_demo_job(root: Path, with_int8: bool = True, target: str = "gpu") -> LocalExportJob:
    """A tiny student trained for a few steps on clips whose label is their brightest colour channel (so logits are
    decisive and argmax agreement means something), 24 eval clips, and, if asked, its int8 QDQ ONNX (with every int8
    form, as the quantize stage keeps them)."""
    import torch.nn.functional as F

    from vidopt.checkpoint import save_model_dir
    from vidopt.data import normalise_clips
    from vidopt.models import Student, StudentArch

    arch = StudentArch(frames=4, height=32, width=32, conv_widths=[8, 16], conv_strides=[2, 2], temporal_widths=[16],
                       pool_grid=2, num_classes=5)

    def clips(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:   # uint8 [n, T, H, W, C], labels [n]
        g = torch.Generator().manual_seed(seed)
        video = torch.randint(0, 160, (n, arch.frames, arch.height, arch.width, 3), generator=g)
        labels = torch.randint(0, arch.num_classes, (n,), generator=g)
        video[torch.arange(n), ..., labels % 3] += 60 + 30 * (labels // 3)[:, None, None, None]
        return video.to(torch.uint8), labels

    torch.manual_seed(0)
    model = Student(arch)
    train_x, train_y = clips(64, seed=1)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):   # train mode also moves the BatchNorm statistics away from (0, 1)
        loss = F.cross_entropy(model(normalise_clips(train_x)), train_y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    root.mkdir(parents=True, exist_ok=True)
    save_model_dir(root / "student", model.eval(), arch, {}, {})
    eval_x, eval_y = clips(24, seed=2)
    torch.save({"clips": eval_x, "labels": eval_y, "videos": torch.arange(24)}, root / "eval.pt")
    int8_dir = None
    if with_int8:
        try:   # the ONNX exporter needs onnxscript, the quantizer onnxruntime: a bare GPU host may lack them
            from vidopt.onnx_utils import INT8_FORMS_DIR, export_onnx, quantize_model_int8
            shape = (3, arch.frames, arch.height, arch.width)
            export_onnx(model, shape, root / "int8" / "model_fp32.onnx")
            calibration = batches(train_x[:32])   # uint8 [B, T, H, W, C], as the quantize stage passes them
            quantize_model_int8(model, shape, root / "int8" / "model_int8.onnx", calibration,
                                forms_dir=root / "int8" / INT8_FORMS_DIR)   # as the quantize stage keeps them
            int8_dir = root / "int8"
        except ImportError as error:
            print(f"demo: no int8 model, {type(error).__name__}: {error}", file=sys.stderr)
    return LocalExportJob(target=target, model_dir=str(root / "student"),
                          int8_dir=str(int8_dir) if int8_dir else None, eval_clips=str(root / "eval.pt"),
                          out_dir=str(root / "out"), options=default_options(target))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    if sys.argv[1] == "--run-aoti":
        print(json.dumps(run_aoti_package(*sys.argv[2:5], threads=int(sys.argv[5]))))
    elif sys.argv[1] == "--demo":
        demo = make_demo_job(Path(sys.argv[2]))
        print(run_target(demo).model_dump_json(indent=2, exclude={"extra": {"variants": {"__all__": {"trace"}}}}))
    else:
        print(run_target(LocalExportJob.model_validate_json(Path(sys.argv[1]).read_text())).model_dump_json(indent=2))
