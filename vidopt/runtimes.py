"""CPU inference runtimes for one ONNX file: onnxruntime (MLAS) and OpenVINO, in f32 or with its bf16 hint. The CPU
target ships whichever is fastest on the machine that serves it (workers/cpu.py); the ladder times every model on
every one of them and compares against the teacher's fastest (vidopt/bench/ladder.py).

    python -m vidopt.runtimes FILE.onnx [--shape 3 16 112 112] [--threads 1]   # each runtime's p50 on this CPU

Runtimes:
  onnxruntime     CPUExecutionProvider; runs QDQ int8 files as int8 (VNNI) and fp32 ones in fp32
  openvino        OpenVINO's CPU plugin with INFERENCE_PRECISION_HINT f32 (its default on AMX CPUs is bf16): QDQ
                  int8 files run as int8, fp32 ones in fp32
  openvino-bf16   the same with the bf16 hint, where the CPU has AMX or AVX-512 BF16: float layers in bf16
A session reads clips as ort_predict does (vidopt/onnx_utils.py model_input) and compiles OpenVINO per input shape
(static shapes run faster than a dynamic batch).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from vidopt import hardware
from vidopt.onnx_utils import OUTPUT_NAME, model_input, ort_session, takes_pixels
from vidopt.timing import interleaved, time_calls

RUNTIMES = ("onnxruntime", "openvino", "openvino-bf16")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")   # /proc/cpuinfo flags of CPUs with native bf16 math


def available() -> list[str]:
    """The runtimes this machine can run: OpenVINO where it is installed, its bf16 hint where the CPU has bf16."""
    names = ["onnxruntime"]
    try:
        import openvino  # noqa: F401
    except ImportError:
        return names
    names.append("openvino")
    try:
        flags = hardware.cpu_flags(hardware.CPUINFO.read_text())
    except OSError:
        flags = set()
    if flags & set(BF16_FLAGS):
        names.append("openvino-bf16")
    return names


def version(runtime: str) -> str:
    if runtime == "onnxruntime":
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"
    import openvino

    return f"openvino {openvino.get_version().split('-')[0]}" + (" (bf16 hint)" if runtime.endswith("bf16") else "")


@functools.cache
def openvino_core():
    """The process's one OpenVINO Core, never destroyed. Its CPU plugin installs a signal stack on its thread and puts
    back the one it found when destroyed; plugins destroyed out of order would leave a freed one installed, and the
    next signal (a DataLoader worker's SIGCHLD) would kill the process with SIGSEGV."""
    import openvino as ov

    return ov.Core()


def openvino_config(runtime: str, threads: int, profile: bool = False) -> dict:
    """OpenVINO CPU plugin settings of a serving session: `threads` threads, one stream, the runtime's precision
    hint; `profile` adds per-layer timings (PERF_COUNT, read from an infer request's profiling_info)."""
    return {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "bf16" if runtime == "openvino-bf16" else "f32",
            **({"PERF_COUNT": True} if profile else {})}


class Session:
    """One ONNX file on one runtime, `threads` threads, batch after batch (the latency a serving process sees)."""

    def __init__(self, runtime: str, path: str | Path, threads: int = 1, profile: bool = False):
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r}; one of {RUNTIMES}")
        if profile and runtime == "onnxruntime":
            raise ValueError("Session: layer profiles are OpenVINO's (onnxruntime's: vidopt bench ops)")
        self.runtime, self.path, self.threads, self.profile = runtime, Path(path), threads, profile
        self._ort = ort_session(path, threads) if runtime == "onnxruntime" else None
        self.pixels = takes_pixels(self._ort) if self._ort is not None else _onnx_takes_pixels(self.path)
        self._compiled: dict[tuple[int, ...], object] = {}
        self._last = None   # the infer request of the last OpenVINO run, for layer_times

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits [B, classes] of one model input ([B, C, T, H, W], uint8 pixels or normalised float)."""
        if self._ort is not None:
            return self._ort.run([OUTPUT_NAME], {self._ort.get_inputs()[0].name: x})[0]
        request = self._compiled.get(x.shape)
        if request is None:
            request = self._compiled[x.shape] = self._compile(x.shape)
        request.infer({0: x})
        self._last = request
        return request.get_output_tensor(0).data.copy()

    def layer_times(self) -> list[dict]:
        """OpenVINO's per-layer timing of the last run of a profiling session: [{"node", "op", "kernel", "us"}] for
        the layers that ran (the compiled graph's: fused, with the layout Reorders it added)."""
        if not self.profile or self._last is None:
            raise ValueError("Session.layer_times: needs a session made with profile=True and one run")
        return [{"node": info.node_name, "op": info.node_type, "kernel": info.exec_type,
                 "us": info.real_time.total_seconds() * 1e6}
                for info in self._last.profiling_info if str(info.status).endswith("EXECUTED")]

    def _compile(self, shape: tuple[int, ...]):
        import openvino as ov

        core = openvino_core()
        model = core.read_model(str(self.path))
        model.reshape({model.inputs[0].any_name: ov.PartialShape(list(shape))})
        return core.compile_model(model, "CPU", openvino_config(self.runtime, self.threads,
                                                                  self.profile)).create_infer_request()

    def predict(self, batches: Iterable) -> np.ndarray:
        """Logits [N, classes] over batches of clips, as ort_predict takes them (stored uint8 or normalised float)."""
        outputs = [self.run(model_input(x, self.pixels)) for x in batches]
        return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)


def _onnx_takes_pixels(path: Path) -> bool:
    import onnx

    return takes_pixels(onnx.load(str(path), load_external_data=False))


def measure(session: Session, input_shape: Sequence[int], batch: int = 1, warmup: int = 3, iters: int = 10,
            min_seconds: float = 0.0, seed: int = 0) -> dict[str, float]:
    """p50/p95 ms per call and clips/s at the median, by the shared protocol (vidopt/timing.py time_calls)."""
    random = np.random.default_rng(seed)
    shape = (batch, *input_shape)
    x = (random.integers(0, 256, shape, dtype=np.uint8) if session.pixels
         else random.standard_normal(shape, dtype=np.float32))
    return time_calls(lambda: session.run(x), batch, warmup, iters, min_seconds)


def compare(candidates: dict[str, tuple[str, str | Path]], input_shape: Sequence[int], batch: int = 1,
            threads: int = 1, rounds: int = 5, warmup: int = 3, iters: int = 10,
            min_seconds: float = 0.0) -> dict[str, dict[str, float]]:
    """{name: (runtime, file)} timed interleaved (vidopt/timing.py interleaved): the median over rounds of each
    statistic, and best_p50_ms, the quietest round's p50, to rank by."""
    sessions = {name: Session(runtime, path, threads) for name, (runtime, path) in candidates.items()}
    return interleaved({name: functools.partial(measure, session, input_shape, batch, warmup, iters, min_seconds)
                        for name, session in sessions.items()}, rounds)


def main(argv: list[str] | None = None) -> dict:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="each CPU runtime's latency for ONNX files on this machine")
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--shape", type=int, nargs=4, default=[3, 16, 112, 112], help="C T H W of one clip")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    candidates = {f"{path.name} {runtime}": (runtime, path) for path in args.files for runtime in available()}
    timed = compare(candidates, args.shape, threads=args.threads, rounds=args.rounds, warmup=2, iters=5,
                    min_seconds=0.25)
    for name, stats in timed.items():
        print(f"{name:60s} p50 {stats['p50_ms']:9.3f} ms  best {stats['best_p50_ms']:9.3f} ms")
    print(json.dumps({runtime: version(runtime) for runtime in available()}))
    return timed


if __name__ == "__main__":
    main()
