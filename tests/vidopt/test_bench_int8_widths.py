"""The int8-by-width benchmark on tiny stacks: one row per width, timings that add up, files written, bad widths refused."""
import json

import onnx
import pytest
import torch

from vidopt.bench import int8_widths
from vidopt.onnx_utils import export_onnx, op_counts, quantize_int8


def test_rows_per_width_and_files(tmp_path):
    out = tmp_path / "report"
    report = int8_widths.main(["--widths", "16", "32", "--frames", "2", "--size", "8", "--depth", "2",
                               "--rounds", "1", "--min-seconds", "0", "--out", str(out)])

    assert json.loads((out / "int8_widths.json").read_text()) == report
    assert [row["width"] for row in report["rows"]] == [16, 32]
    for row in report["rows"]:
        assert row["fp32_p50_ms"] > 0 and row["int8_p50_ms"] > 0
        assert row["int8_speedup"] == pytest.approx(row["fp32_p50_ms"] / row["int8_p50_ms"])
        assert row["gmacs"] == pytest.approx(2 * 2 * 8 * 8 * row["width"] ** 2 * 9 / 1e9)
    assert "| 32 |" in (out / "int8_widths.md").read_text()


def test_stack_is_quantized_the_pipelines_way(tmp_path):
    """Every conv of the stack becomes int8 (a QDQ pair around each), so the timing is int8's and not fp32's."""
    fp32 = export_onnx(int8_widths.conv_stack(16, 3), (16, 8, 8), tmp_path / "fp32.onnx")
    int8 = quantize_int8(fp32, tmp_path / "int8.onnx", [torch.randn(2, 16, 8, 8)])
    counts = op_counts(int8)
    assert counts["Conv"] == 3
    weights = [i for i in onnx.load(str(int8)).graph.initializer
               if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]  # [out, in, 3, 3]
    assert len(weights) == 3  # each conv's weight is stored as int8


def test_widths_not_multiple_of_four_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        int8_widths.main(["--widths", "16", "6", "--out", str(tmp_path)])
    assert "multiples of 4" in capsys.readouterr().err
