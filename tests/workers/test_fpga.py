"""FPGA target: a small trained student -> two hls4ml IPs, verified in the C++ emulation against PyTorch."""
import shutil
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vidopt.artifacts import FpgaOptions, LocalExportJob
from vidopt.checkpoint import save_model_dir
from vidopt.data import normalise_clips
from vidopt.models import Student, StudentArch
from workers import fpga

# The pipeline's 5x5 stride-4 stem (padded by 2): 28x28 -> 7 -> 7. A 7x7 map pooled to a 2x2 grid uses overlapping
# windows (kernel 4, stride 3), the case hls4ml's io_stream pooling rejects and the worker rewrites as a conv; 16x16
# would not exercise it.
ARCH = StudentArch(frames=4, height=28, width=28, conv_widths=[4, 8], conv_strides=[4, 1], stem_kernel=5,
                   temporal_widths=[8], pool_grid=2, num_classes=3)


def _clips(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 clips [n, T, H, W, C] whose label is the colour channel that is brightest on average: learnable in a few
    steps, so the logits are decisive and argmax agreement means something."""
    g = torch.Generator().manual_seed(seed)
    clips = torch.randint(0, 160, (n, ARCH.frames, ARCH.height, ARCH.width, 3), generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    clips[torch.arange(n), ..., labels] += 90
    return clips.to(torch.uint8), labels


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("fpga")
    torch.manual_seed(0)
    model = Student(ARCH)
    train_x, train_y = _clips(64, seed=1)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(25):  # train mode also moves the BN running stats away from (0, 1)
        loss = F.cross_entropy(model(normalise_clips(train_x)), train_y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    save_model_dir(root / "student", model.eval(), ARCH, {}, {})
    clips, labels = _clips(48, seed=2)
    torch.save({"clips": clips, "labels": labels, "videos": torch.arange(48)}, root / "eval.pt")
    return LocalExportJob(target="fpga", model_dir=str(root / "student"), eval_clips=str(root / "eval.pt"),
                          out_dir=str(root / "out"), options=FpgaOptions(fixed_width=16, calibration_clips=16))


def test_fixed_type_covers_range_with_sign_and_margin():
    assert fpga.fixed_type(-3.0, 2.0, 16, 1) == "fixed<16,4,RND,SAT>"     # 2 magnitude bits + sign + margin
    assert fpga.fixed_type(0.0, 4.0, 16, 1) == "ufixed<16,4,RND,SAT>"     # 4.0 needs 3 bits, no sign
    assert fpga.fixed_type(-0.1, 0.05, 12, 0) == "fixed<12,-2,RND,SAT>"   # small weights: negative integer bits
    assert fpga.fixed_type(-1e9, 0.0, 16, 1) == "fixed<16,16,RND,SAT>"    # never more integer bits than the width


def test_overlapping_pool_becomes_an_equal_conv():
    pool = nn.AvgPool2d((4, 4), (3, 3))
    replaced = fpga._stream_safe_pool(pool, 5)
    assert isinstance(replaced, nn.Conv2d)
    x = torch.randn(2, 5, 7, 7)
    torch.testing.assert_close(replaced(x), pool(x))
    assert fpga._stream_safe_pool(nn.AvgPool2d(2, 2), 5).__class__ is nn.AvgPool2d


def test_a_final_map_already_the_grid_folds_without_a_pool():
    arch = StudentArch.model_validate({**ARCH.model_dump(), "height": 8, "width": 8})  # 8 -> 2 -> 2: the 2x2 grid
    model = Student(arch).eval()
    encoder, _head = fpga.fold_student(model, arch)
    assert [name for name, _ in encoder.named_children()] == ["conv0", "relu0", "conv1", "relu1", "flatten"]
    frames = torch.randn(3, 6, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(encoder(frames), model.encoder(frames), atol=1e-5, rtol=1e-5)


def test_missing_compiler_or_hls4ml_skips(job, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(fpga.shutil, "which", lambda _name: None)
        result = fpga.run_target(job)
    assert result.status == "skipped" and "g++" in result.reason
    monkeypatch.setitem(sys.modules, "hls4ml", None)  # what `import hls4ml` sees where it is not installed
    result = fpga.run_target(job)
    assert result.status == "skipped" and "hls4ml is not importable" in result.reason


@pytest.mark.skipif(shutil.which("g++") is None, reason="hls4ml's emulation needs g++")
def test_two_ips_match_pytorch(job):
    pytest.importorskip("hls4ml")
    started = time.monotonic()
    result = fpga.run_target(job)
    print(f"fpga run_target: {time.monotonic() - started:.1f} s, {result.extra['compile_s']}")
    assert result.status == "ok", result.reason
    assert result.runtime.startswith("hls4ml ") and "emulation" in result.runtime
    assert result.parity["argmax_agreement"] >= 0.99
    assert result.parity["max_abs_diff"] < 0.5                       # 16-bit fixed point, not just the same argmax
    assert result.top1 > 0.6                                          # the student learned the task (chance: 1/3)
    assert result.top1 >= result.parity["reference_top1"] - 0.01
    assert result.latency_ms is None and "vendor" in result.extra["latency_note"]
    types = result.extra["layer_types"]
    assert types["encoder"]["relu0"].startswith("ufixed<16,") and types["head"]["fc"].startswith("fixed<16,")

    with tarfile.open(result.artifact_uri) as tar:
        names = set(tar.getnames())
        readme = tar.extractfile("fpga_hls_project/README.md").read().decode()
    for ip in ("encoder", "head"):
        assert f"fpga_hls_project/{ip}/firmware/{ip}.cpp" in names
        assert f"fpga_hls_project/{ip}/build_prj.tcl" in names
        assert f"fpga_hls_project/{ip}/tb_data/tb_input_features.dat" in names
    assert not [n for n in names if n.endswith((".so", ".o"))]    # host binaries are rebuilt, not shipped
    assert "vitis-run --tcl build_prj.tcl" in readme and "[28, 28, 6]" in readme and "[4, 32]" in readme
    assert "next frame minus this one" in readme  # the host computes the frame differences
    assert result.artifact_bytes > 0

    # The archive as its MLflow model runs it (vidopt/mlflow_hls_model.py): compiled from the shipped sources, the
    # host's frame differences in numpy, the same emulated logits the target verified.
    from types import SimpleNamespace

    from vidopt.mlflow_hls_model import HlsClipClassifier
    from workers.common import VERIFIED_LOGITS

    unpacked = Path(job.out_dir) / "unpacked"
    with tarfile.open(result.artifact_uri) as tar:
        tar.extractall(unpacked, filter="data")
    classifier = HlsClipClassifier()
    classifier.load_context(SimpleNamespace(artifacts={"project": str(unpacked / "fpga_hls_project")}))
    clips = torch.load(job.eval_clips, weights_only=True)["clips"][:2].numpy()       # uint8 [2, T, H, W, 3]
    verified = np.load(Path(job.out_dir) / VERIFIED_LOGITS)[:2]
    np.testing.assert_allclose(classifier.predict(None, clips), verified, atol=1e-5)
