"""Every CPU runtime runs the same ONNX file to the same logits (bf16 within its precision), reads clips as
onnxruntime does, and is timed by the same protocol."""
import numpy as np
import pytest
import torch

from vidopt import runtimes
from vidopt.models import StudentArch, build_model
from vidopt.onnx_utils import export_onnx

SHAPE = (3, 8, 32, 32)   # [C, T, H, W]


@pytest.fixture(scope="module")
def fp32_file(tmp_path_factory):
    torch.manual_seed(0)
    arch = StudentArch(frames=8, height=32, width=32, conv_widths=[16, 16, 32, 32], conv_strides=[2, 1, 2, 2],
                       temporal_widths=[32], pool_grid=2, num_classes=5)
    return export_onnx(build_model(arch).eval(), SHAPE, tmp_path_factory.mktemp("rt") / "student.onnx")


def clips(n: int = 6) -> torch.Tensor:
    c, t, h, w = SHAPE
    return torch.randint(0, 256, (n, t, h, w, c), generator=torch.Generator().manual_seed(1),
                         dtype=torch.uint8)   # stored clips [N, T, H, W, C]


def test_onnxruntime_is_always_available_and_versions_name_the_runtime():
    names = runtimes.available()
    assert names[0] == "onnxruntime" and set(names) <= set(runtimes.RUNTIMES)
    for name in names:
        assert runtimes.version(name).startswith(name.split("-")[0] + " ")


@pytest.mark.parametrize("runtime", [r for r in runtimes.RUNTIMES if r != "onnxruntime"])
def test_each_runtime_gives_onnxruntimes_logits(runtime, fp32_file):
    if runtime not in runtimes.available():
        pytest.skip(f"{runtime} does not run on this machine")
    batches = [clips()[:4], clips()[4:]]   # two shapes: each compiled on its own
    reference = runtimes.Session("onnxruntime", fp32_file).predict(batches)
    logits = runtimes.Session(runtime, fp32_file).predict(batches)
    assert logits.shape == reference.shape == (6, 5)
    tolerance = 1e-4 if runtime == "openvino" else 0.05 * np.abs(reference).max()   # bf16: 8 bits of mantissa
    assert np.abs(logits - reference).max() <= tolerance


def test_compare_times_every_candidate_by_its_quietest_round(fp32_file):
    timed = runtimes.compare({r: (r, fp32_file) for r in runtimes.available()}, SHAPE, rounds=2, warmup=1, iters=2)
    assert set(timed) == set(runtimes.available())
    for stats in timed.values():
        assert 0 < stats["best_p50_ms"] <= stats["p50_ms"] + 1e-9 and stats["throughput_clips_s"] > 0


def test_an_unknown_runtime_is_refused(fp32_file):
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'"):
        runtimes.Session("tensorrt", fp32_file)



CHILD = """
import ctypes, gc, sys
import numpy as np
from torch.utils.data import DataLoader
from vidopt import runtimes


class stack_t(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def signal_stack():
    current = stack_t()
    ctypes.CDLL(None).sigaltstack(None, ctypes.byref(current))
    return current.ss_sp or 0


stacks, sessions = [], [runtimes.Session(sys.argv[2], sys.argv[1]) for _ in range(2)]
for session in sessions:
    session.run(np.zeros((1, 3, 8, 32, 32), np.float32))
    stacks.append(signal_stack())
while sessions:
    del sessions[0]   # destroyed in the order they were made, not the reverse
    gc.collect()
    stacks.append(signal_stack())
print(len(set(stacks)), sum(len(b) for b in DataLoader(list(range(8)), batch_size=2, num_workers=2)))
"""


def test_openvino_sessions_leave_one_signal_stack_and_the_process_able_to_fork(fp32_file):
    """OpenVINO's CPU plugin installs a signal stack on its thread (for AMX's larger signal frames) and, destroyed,
    puts back the one it found: with a plugin per session, sessions destroyed out of order left a freed stack installed
    and the next signal (a DataLoader worker's SIGCHLD) was a SIGSEGV. One Core per process: one stack, kept."""
    import subprocess
    import sys

    if "openvino" not in runtimes.available():
        pytest.skip("openvino is not installed")
    done = subprocess.run([sys.executable, "-c", CHILD, str(fp32_file), "openvino"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["1", "8"]   # one signal stack throughout; all 8 items back from the workers
