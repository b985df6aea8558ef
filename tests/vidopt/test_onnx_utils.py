"""ONNX export, onnxruntime parity, static int8 quantization and latency measurement, on small models."""
import time

import numpy as np
import onnx
import pytest
import torch

from vidopt.models import StudentArch, TeacherArch, build_model
from vidopt.onnx_utils import (
    OPSET,
    compare_latency,
    export_onnx,
    file_mb,
    measure_latency,
    op_counts,
    ort_predict,
    ort_session,
    quantize_int8,
)

SHAPE = (3, 4, 32, 32)  # [C, T, H, W]
# What the student may contain after export: BN folded into Conv, ReLU, pooling, the classifier, data movement.
STUDENT_OPS = {"Conv", "Relu", "AveragePool", "Gemm", "MatMul", "Reshape", "Transpose", "Flatten",
               "Slice", "Concat", "Sub"}  # the last three: frame differences (vidopt/models.py)


def _with_bn_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BN running stats (fresh ones are mean 0 / var 1), so a wrong BN fold shows in the logits."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, *SHAPE) * 2 + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    arch = StudentArch(frames=4, height=32, width=32, conv_widths=[8, 16, 16], conv_strides=[2, 2, 2],
                       temporal_widths=[16], num_classes=6)
    return _with_bn_statistics(build_model(arch))


@pytest.fixture(scope="module")
def student_onnx(student, tmp_path_factory):
    return export_onnx(student, SHAPE, tmp_path_factory.mktemp("onnx") / "student.onnx")


def test_student_export_is_a_clean_graph_with_dynamic_batch_and_parity(student, student_onnx):
    model = onnx.load(str(student_onnx))
    ops = op_counts(student_onnx)
    assert set(ops) <= STUDENT_OPS, f"unexpected ops {set(ops) - STUDENT_OPS}"
    assert ops["Conv"] == 4 and "BatchNormalization" not in ops  # 3 Conv2d + 1 Conv1d, every BN folded in
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= max(OPSET, 17)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert not student.training
    session = ort_session(student_onnx, threads=1)
    for batch in (1, 3):  # dynamic batch: sizes other than the example's
        x = torch.randn(batch, *SHAPE)
        with torch.no_grad():
            expected = student(x).numpy()
        got = ort_predict(session, [x])
        assert got.shape == (batch, 6)
        assert np.abs(got - expected).max() <= 1e-4


def test_export_keeps_training_mode_and_fixed_batch_option(student, tmp_path):
    student.train()
    path = export_onnx(student, SHAPE, tmp_path / "fixed.onnx", dynamic_batch=False)
    assert student.training
    student.eval()
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, *SHAPE]


def test_teacher_export_folds_bn_and_matches_pytorch(tmp_path):
    torch.manual_seed(1)
    teacher = _with_bn_statistics(build_model(TeacherArch(arch="r2plus1d_18", width=0.125, num_classes=5)))
    path = export_onnx(teacher, SHAPE, tmp_path / "teacher.onnx")
    ops = op_counts(path)
    assert "BatchNormalization" not in ops and ops["Conv"] > 30
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        expected = teacher(x).numpy()
    assert np.abs(ort_predict(ort_session(path), [x]) - expected).max() <= 1e-4


def test_int8_quantization_is_qdq_smaller_and_close_to_fp32(student, student_onnx, tmp_path):
    calibration = [torch.randn(8, *SHAPE) for _ in range(4)]
    int8 = quantize_int8(student_onnx, tmp_path / "int8.onnx", calibration)
    ops = op_counts(int8)
    assert ops.get("QuantizeLinear", 0) >= 4 and ops.get("DequantizeLinear", 0) >= 4
    # Weights are stored as int8 (1 byte per element instead of 4), except the stem's: a conv with 6 input channels
    # (RGB and frame differences) has no fast int8 kernel and stays fp32. On a model this small names and scales
    # weigh too, so check the weights, not just the file.
    model = onnx.load(str(int8))
    int8_weights = [t for t in model.graph.initializer  # (1-D int8 tensors are zero points)
                    if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
    float_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2]
    assert len(int8_weights) == 4  # Conv2d 8->16, Conv2d 16->16, Conv1d, Linear
    assert [list(t.dims) for t in float_weights] == [[8, 6, 3, 3]]
    fp32_weights = [t for t in onnx.load(str(student_onnx)).graph.initializer if len(t.dims) >= 2]
    assert sum(np.prod(t.dims) for t in int8_weights + float_weights) == sum(np.prod(t.dims) for t in fp32_weights)
    assert file_mb(int8) < file_mb(student_onnx)
    # The stem's input path (frame differences, layout changes) stays fp32 as a whole: no Quantize/Dequantize pair
    # before the stem, whose fp32 output is the first thing quantized.
    stem = next(n for n in model.graph.node if n.op_type == "Conv")
    produced_by = {out: n for n in model.graph.node for out in n.output}
    upstream, frontier = [], [stem.input[0]]
    while frontier:
        node = produced_by.get(frontier.pop())
        if node is not None:
            upstream.append(node.op_type)
            frontier += list(node.input)
    assert {"Slice", "Sub", "Concat"} <= set(upstream)
    assert not {"QuantizeLinear", "DequantizeLinear"} & set(upstream), upstream

    x = torch.randn(16, *SHAPE)
    fp32 = ort_predict(ort_session(student_onnx), [x])
    quantized = ort_predict(ort_session(int8), [x])
    # int8 noise is a few percent of the logits' spread on data like the calibration data; a wrong scale is not.
    assert np.abs(quantized - fp32).mean() < 0.1 * fp32.std()


def test_session_threads_and_latency_statistics(student_onnx):
    assert ort_session(student_onnx, threads=2).get_session_options().intra_op_num_threads == 2
    stats = measure_latency(student_onnx, SHAPE, batch=4, threads=1, warmup=1, iters=5)
    assert set(stats) == {"p50_ms", "p95_ms", "throughput_clips_s"}
    assert 0 < stats["p50_ms"] <= stats["p95_ms"]
    assert stats["throughput_clips_s"] == pytest.approx(4 * 1000 / stats["p50_ms"])
    started = time.perf_counter()  # a time floor keeps calling past `iters` (one call of this model is ~1 ms)
    measure_latency(student_onnx, SHAPE, batch=1, threads=1, warmup=0, iters=1, min_seconds=0.2)
    assert time.perf_counter() - started >= 0.2


def test_compare_latency_ranks_a_much_bigger_model_slower(student_onnx, tmp_path):
    big = build_model(StudentArch(frames=4, height=32, width=32, conv_widths=[64, 128, 128], conv_strides=[1, 1, 2],
                                  temporal_widths=[128], num_classes=6))  # ~100x the small student's MACs
    big_onnx = export_onnx(big, SHAPE, tmp_path / "big.onnx")
    timed = compare_latency({"small": student_onnx, "big": big_onnx}, SHAPE, batch=1, threads=1, rounds=3, iters=5)
    assert set(timed) == {"small", "big"}
    assert timed["big"]["p50_ms"] > 3 * timed["small"]["p50_ms"]
