"""TPU target: the fp32 student as a StableHLO bundle (torch-xla), reloaded in a fresh process and run on PJRT.

    python -m workers.tpu JOB.json      # run one export job (see vidopt.artifacts.LocalExportJob) and print its result

The Ray worker that calls `run_target` never imports torch_xla: export and verification each run in a child process.
The verifying child is the proof that the saved files alone reproduce the model (nothing shared with the exporter),
and keeping PJRT out of the parent means a TPU is never held by a long-lived worker when the verifier needs it.
Export traces on PJRT CPU: StableHLO is device independent, so tracing never needs the accelerator.

Latency note (torch-xla 2.9): every `StableHLOGraphModule` call converts the StableHLO to HLO and compiles it again
with no cache (`XLAGraphExecutor::ExecuteStablehlo`; ~0.5 s per call here, the `CompileTime` metric). `latency_ms` is
the wall time of a call minus that compile, i.e. what a server that keeps the compiled executable pays; the raw call
time and the compile time are in `extra`. Because of that, the eval set is verified through the same model exported
at a static batch of up to MAX_VERIFY_BATCH (one compile per batch, not per clip), and the shipped batch-1 program
itself on the first `latency_iters` clips, one distinct clip per timed call: the timed calls are the check, so no
compile is spent twice. Both checks are gated by the same tolerance.
"""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from vidopt.artifacts import LocalExportJob, TargetResult
from workers.common import archive, correct, load_eval_clips, parity, reference_logits, run_module, top1

FP32_TOL = 1e-4          # max |logit| difference allowed between the reloaded fp32 StableHLO and PyTorch
BF16_REL_TOL = 5e-2      # bf16 keeps 8 mantissa bits (~4e-3 per rounding); reported against max |logit|, not gated
MAX_VERIFY_BATCH = 64    # static batch of the verification-only export: the eval set in equal batches of at most this
NO_TORCH_XLA = 3         # exit code of a child that cannot import torch_xla


def pjrt_device(options, tpu_chips: int) -> str:
    """The job's `pjrt_device` option, else 'TPU' when the exporting child counted TPU chips on this host, else 'CPU'."""
    if options.pjrt_device:
        return options.pjrt_device.upper()
    return "TPU" if tpu_chips > 0 else "CPU"


def run_target(job: LocalExportJob) -> TargetResult:
    started = time.monotonic()
    if importlib.util.find_spec("torch_xla") is None:
        return TargetResult(target="tpu", status="skipped",
                            reason="torch_xla is not installed here (pip install torch-xla==<torch version>)")
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bf16 = job.options.bf16
    programs = {"fp32": out / "stablehlo"} | ({"bf16": out / "stablehlo_bf16"} if bf16 else {})
    work = out / "verify"
    work.mkdir(exist_ok=True)

    x, truth = load_eval_clips(job)
    export_cmd = ["--export", job.model_dir, str(out), "--verify-batch", str(verify_batch(len(x)))]
    export_cmd += ["--bf16"] if bf16 else []
    exported = _child(export_cmd, "CPU", job)
    if exported.returncode:
        return _child_failure("export", exported, started)
    report = json.loads(exported.stdout.strip().splitlines()[-1])
    device = pjrt_device(job.options, report["tpu_chips"])
    iters = str(job.options.latency_iters)
    verified = _child(["--verify", *map(str, programs.values()), "--clips", job.eval_clips, "--work", str(work),
                       "--iters", iters], device, job)
    if verified.returncode:
        return _child_failure("verify", verified, started)

    reference = reference_logits(job, x)
    variants = {}
    for name, program in programs.items():
        logits = np.load(work / f"{program.name}.npy")
        shipped = np.load(work / f"{program.name}_shipped.npy")
        timing = json.loads((work / f"{program.name}.json").read_text())
        check = parity(logits, reference)
        shipped_check = parity(shipped, reference[:len(shipped)])
        check["max_abs_diff"] = max(check["max_abs_diff"], shipped_check["max_abs_diff"])
        scale = float(np.abs(reference).max())
        variants[name] = {
            "runtime": timing["runtime"], "parity": check, "top1": top1(logits, truth),
            "correct": correct(logits, truth),
            "latency_ms": timing["latency_ms"], "call_wall_ms": timing["call_wall_ms"],
            "compile_ms": timing["compile_ms"], "export_s": report[name]["export_s"],
            "rel_max_abs_diff": check["max_abs_diff"] / max(scale, 1e-12),
            "shipped_batch1_parity": {**shipped_check, "clips": len(shipped)},
            "artifact": str(archive(program, out / f"{program.name}.tar.gz")),
        }
        variants[name]["bytes"] = Path(variants[name]["artifact"]).stat().st_size
    fp32 = variants["fp32"]
    if bf16:
        variants["bf16"]["within_tolerance"] = variants["bf16"]["rel_max_abs_diff"] <= BF16_REL_TOL
        variants["bf16"]["tolerance"] = f"max_abs_diff <= {BF16_REL_TOL} * max|logit| (reported, not gated)"
    ok = fp32["parity"]["max_abs_diff"] <= FP32_TOL
    artifact = Path(fp32["artifact"])
    return TargetResult(
        target="tpu", status="ok" if ok else "failed",
        reason="" if ok else f"reloaded StableHLO differs from PyTorch by {fp32['parity']['max_abs_diff']:.2e} "
                             f"(> {FP32_TOL})",
        runtime=fp32["runtime"], artifact_uri=str(artifact), artifact_bytes=artifact.stat().st_size,
        parity=fp32["parity"], top1=fp32["top1"], correct=fp32["correct"], latency_ms=fp32["latency_ms"],
        seconds=time.monotonic() - started, extra={"variants": variants, "pjrt_device": device},
    )


def verify_batch(clips: int) -> int:
    """The smallest static batch that covers `clips` in as few batches of <= MAX_VERIFY_BATCH as possible (88 -> 44)."""
    return math.ceil(clips / math.ceil(clips / MAX_VERIFY_BATCH))


def _child(args: list[str], device: str, job: LocalExportJob) -> subprocess.CompletedProcess:
    return run_module("workers.tpu", args, job.options.timeout_s,
                      env={"PJRT_DEVICE": device}, timeout_note="(option timeout_s)")


def _child_failure(step: str, proc: subprocess.CompletedProcess, started: float) -> TargetResult:
    tail = (proc.stderr or proc.stdout).strip()[-1500:]
    status = "skipped" if proc.returncode == NO_TORCH_XLA else "failed"
    return TargetResult(target="tpu", status=status, reason=f"tpu {step} (child exit {proc.returncode}): {tail}",
                        seconds=time.monotonic() - started)


# ---- child process: export ------------------------------------------------------------------------------------------

def _bf16_compute(model):
    """The student computing in bf16 end to end (weights, activations, BN) with fp32 input and output. Weights are
    stored as fp32 holding bf16-rounded values and cast in the graph: torch-xla 2.9 saves weights through numpy, which
    has no bfloat16 ("Got unsupported ScalarType BFloat16")."""
    import torch
    from torch.func import functional_call

    class Bf16Compute(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner.to(torch.bfloat16).float()   # round once; the in-graph cast back is then exact

        def forward(self, x):
            state = {**dict(self.inner.named_parameters()), **dict(self.inner.named_buffers())}
            state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
            return functional_call(self.inner, state, (x.to(torch.bfloat16),)).float()

    return Bf16Compute(model).eval()


def export_stablehlo(model_dir: str, out: Path, bf16: bool, batch: int) -> dict:
    """torch.export (batch 1, static: torch-xla's dynamic-batch export needs EXPERIMENTAL_XLA_UNBOUNDED_DYNAMISM) ->
    StableHLO -> out/stablehlo (and out/stablehlo_bf16); the same at `batch` under out/verify/batched/."""
    import shutil

    import torch
    from torch_xla._internal import tpu  # a PCI scan: starts no PJRT client
    from torch_xla.stablehlo import exported_program_to_stablehlo

    from vidopt.checkpoint import load_model_dir
    from vidopt.data import KINETICS_MEAN, KINETICS_STD

    model, arch = load_model_dir(model_dir)
    names = Path(model_dir) / "classes.json"
    classes = json.loads(names.read_text()) if names.exists() else None
    example = (torch.randn(1, 3, arch.frames, arch.height, arch.width),)  # [1, C, T, H, W]
    batched = (torch.randn(batch, 3, arch.frames, arch.height, arch.width),)
    report: dict = {"tpu_chips": tpu.num_available_chips()}
    for name, module in [("fp32", model)] + ([("bf16", _bf16_compute(load_model_dir(model_dir)[0]))] if bf16 else []):
        started = time.monotonic()
        target = out / ("stablehlo" if name == "fp32" else "stablehlo_bf16")
        for directory, inputs in ((out / "verify" / "batched" / target.name, batched), (target, example)):
            with torch.no_grad():
                program = exported_program_to_stablehlo(torch.export.export(module, inputs))
            shutil.rmtree(directory, ignore_errors=True)
            program.save(str(directory))
        (target / "signature.json").write_text(json.dumps({
            "input": {"layout": "[1, 3, T, H, W] float32, RGB scaled to [0, 1] then standardised with Kinetics "
                      "mean/std (vidopt.data.normalise_clips)", "shape": list(example[0].shape),
                      "normalise": {"mean": list(KINETICS_MEAN), "std": list(KINETICS_STD)}},
            "output": {"layout": "[1, classes] float32 logits"}, "compute_dtype": name,
            "classes": classes}, indent=2))
        report[name] = {"export_s": time.monotonic() - started}
    return report


# ---- child process: verify ------------------------------------------------------------------------------------------

def verify_stablehlo(program_dirs: list[str], clips_file: str, work: Path, iters: int) -> None:
    """Reload each program with StableHLOGraphModule.load, run every eval clip (batch 1) on the PJRT device, time it;
    writes work/<name>.npy (logits [N, classes]) and work/<name>.json (runtime, latency)."""
    import torch
    import torch_xla
    import torch_xla.debug.metrics as met
    import torch_xla.runtime as xr
    from torch_xla.stablehlo import StableHLOGraphModule

    from vidopt.data import normalise_clips

    device = torch_xla.device()
    clips = normalise_clips(torch.load(clips_file, map_location="cpu", weights_only=True)["clips"])  # [N, C, T, H, W]
    runtime = f"torch-xla {torch_xla.__version__} StableHLO on PJRT {xr.device_type()}"

    def compile_ns() -> float:
        data = met.metric_data("CompileTime")   # (samples, accumulated ns, recent samples)
        return float(data[1]) if data else 0.0

    def call(x: torch.Tensor) -> tuple[np.ndarray, float, float]:
        before, started = compile_ns(), time.perf_counter()
        out = program(x.to(device))               # one output: a tensor; torch-xla returns a list for several
        logits = (out[0] if isinstance(out, (list, tuple)) else out).cpu()  # .cpu() waits for the device
        wall = (time.perf_counter() - started) * 1e3
        return logits.numpy(), wall, (compile_ns() - before) / 1e6

    batch = verify_batch(len(clips))  # what the exporting child was given for these clips
    pad = -len(clips) % batch         # repeat the last clip up to a whole batch; its extra logits are dropped
    padded = torch.cat([clips, clips[-1:].expand(pad, *clips.shape[1:])])
    for program_dir in map(Path, program_dirs):
        program = StableHLOGraphModule.load(str(work / "batched" / program_dir.name))
        logits = np.concatenate([call(padded[i:i + batch])[0] for i in range(0, len(padded), batch)])
        program = StableHLOGraphModule.load(str(program_dir))  # the shipped batch-1 program
        runs = [call(clips[i % len(clips):][:1]) for i in range(iters)]  # clip i on call i: timed and checked
        shipped = np.concatenate([r[0] for r in runs[:len(clips)]])
        walls, compiles = np.array([r[1:] for r in runs]).T
        np.save(work / f"{program_dir.name}.npy", logits[:len(clips)].astype(np.float32))
        np.save(work / f"{program_dir.name}_shipped.npy", shipped.astype(np.float32))
        (work / f"{program_dir.name}.json").write_text(json.dumps({
            "runtime": runtime, "call_wall_ms": float(np.median(walls)), "compile_ms": float(np.median(compiles)),
            "latency_ms": float(np.median(walls - compiles))}))


def _main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] in ("--export", "--verify"):
        try:
            import torch_xla  # noqa: F401
        except ImportError as error:
            print(f"torch_xla does not import here: {error}", file=sys.stderr)
            return NO_TORCH_XLA
    if argv[0] == "--export":
        batch = int(argv[argv.index("--verify-batch") + 1])
        print(json.dumps(export_stablehlo(argv[1], Path(argv[2]), "--bf16" in argv, batch)))
    elif argv[0] == "--verify":
        dirs = argv[1:argv.index("--clips")]
        verify_stablehlo(dirs, argv[argv.index("--clips") + 1], Path(argv[argv.index("--work") + 1]),
                         int(argv[argv.index("--iters") + 1]))
    else:
        print(run_target(LocalExportJob.model_validate_json(Path(argv[0]).read_text())).model_dump_json(indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
