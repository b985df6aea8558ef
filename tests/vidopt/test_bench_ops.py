"""The per-node profile: real onnxruntime profiles of small fp32 / int8 files and of a project's int8 forms."""
import json

import pytest
import torch

from vidopt.bench import int8_widths, ops
from vidopt.checkpoint import save_model_dir
from vidopt.models import StudentArch, build_model
from vidopt.onnx_utils import (FP32_FILE, INT8_FORMS_DIR, export_onnx, int8_form_files, quantize_int8,
                               quantize_model_int8)


def _conv_files(tmp_path):
    torch.manual_seed(0)
    fp32 = export_onnx(int8_widths.conv_stack(16, 2), (16, 8, 8), tmp_path / "fp32.onnx")
    return fp32, quantize_int8(fp32, tmp_path / "int8.onnx", [torch.randn(2, 16, 8, 8)])


def test_profiles_each_file_node_by_node(tmp_path):
    fp32, int8 = _conv_files(tmp_path)
    out = tmp_path / "report"
    report = ops.main([str(fp32), str(int8), "--calls", "20", "--warmup", "5", "--out", str(out)])

    assert json.loads((out / "ops.json").read_text()) == report
    models = report["models"]
    assert list(models) == [str(fp32), str(int8)]
    for profile in models.values():
        times = [row["us"] for row in profile["nodes"]]
        assert times == sorted(times, reverse=True) and all(t >= 0 for t in times)
        assert profile["nodes_us"] == pytest.approx(sum(times))
        assert profile["model_run_us"] >= max(times)   # a whole run holds each of its nodes
    # The int8 file runs onnxruntime's integer convs, the fp32 one its float convs: the profile names what ran.
    assert "QLinearConv" in {row["op"] for row in models[str(int8)]["nodes"]}
    assert not {"QLinearConv", "QuantizeLinear"} & {row["op"] for row in models[str(fp32)]["nodes"]}
    assert "| QLinearConv |" in (out / "ops.md").read_text()


def test_project_dir_profiles_the_fp32_file_and_every_int8_form(tmp_path):
    arch = StudentArch(frames=4, height=32, width=32, conv_widths=[16, 16], conv_strides=[2, 2],
                       temporal_widths=[16], num_classes=3)
    model_dir = tmp_path / "project" / "stages" / "quantize" / "key" / "model"
    torch.manual_seed(0)
    student = build_model(arch).eval()
    stored = torch.randint(0, 256, (2, 4, 32, 32, 3), dtype=torch.uint8)   # uint8 [B, T, H, W, C], as stored
    forms_dir = tmp_path / "onnx" / INT8_FORMS_DIR
    quantize_model_int8(student, (3, 4, 32, 32), tmp_path / "onnx" / "int8.onnx", [stored], forms_dir=forms_dir)
    extra = {FP32_FILE: export_onnx(student, (3, 4, 32, 32), tmp_path / "onnx" / FP32_FILE),
             INT8_FORMS_DIR: forms_dir}
    save_model_dir(model_dir, student, arch, {}, {"run": {"seed": 0}}, extra)

    out = tmp_path / "report"
    report = ops.main(["--project-dir", str(tmp_path / "project"), "--calls", "5", "--warmup", "1", "--out", str(out)])

    forms = int8_form_files(model_dir / INT8_FORMS_DIR)
    assert list(report["models"]) == ["fp32"] + [f"int8 {path.stem}" for path in forms.values()]
    assert sorted(report["forms"].values()) == sorted(forms)   # each short name's legend is its form's name
    assert report["models"]["fp32"]["file"] == str(model_dir / FP32_FILE)
    table = (out / "ops.md").read_text()
    assert all(f"`int8 {path.stem}`: {name}" in table for name, path in forms.items())


def test_missing_file_or_nothing_to_profile_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ops.main([str(tmp_path / "absent.onnx"), "--out", str(tmp_path)])
    assert f"no such ONNX file: {tmp_path / 'absent.onnx'}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ops.main(["--out", str(tmp_path)])
    assert "name ONNX files to profile" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no quantize model dir"):
        ops.main(["--project-dir", str(tmp_path / "empty"), "--out", str(tmp_path)])


def test_openvino_profiles_name_each_layers_kernel(tmp_path):
    from vidopt import runtimes

    if "openvino" not in runtimes.available():
        pytest.skip("openvino is not installed")
    _, int8 = _conv_files(tmp_path)
    out = tmp_path / "report"
    report = ops.main([str(int8), "--runtime", "openvino", "--calls", "20", "--warmup", "5", "--out", str(out)])

    profile = report["models"][str(int8)]
    times = [row["us"] for row in profile["nodes"]]
    assert times == sorted(times, reverse=True) and all(t >= 0 for t in times)
    assert profile["model_run_us"] >= max(times) and report["setup"]["runtime"] == "openvino"
    # the QDQ convs run as OpenVINO's int8 convolutions: the kernel's name says so
    convs = [row for row in profile["nodes"] if row["op"] == "Convolution"]
    assert len(convs) == 2 and all(row["kernel"].endswith(("I8", "u8", "i8")) for row in convs), convs
    assert "| node | op | kernel | us |" in (out / "ops.md").read_text()
