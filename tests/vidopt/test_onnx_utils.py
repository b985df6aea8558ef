"""ONNX export, onnxruntime parity, static int8 quantization and latency measurement, on small models."""
import json
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from vidopt.data import normalise_clips
from vidopt.models import PIXEL_MAX, DeployedStudent, StudentArch, TeacherArch, build_model
from vidopt.onnx_utils import (
    FORMS_INDEX,
    INT8_WEIGHT_MAX,
    OPSET,
    ExportParityError,
    compare_latency,
    correct_constant_plane_rounding,
    drop_pixel_requantization,
    export_onnx,
    faithful_int8_forms,
    fewest_macs_int8_form,
    file_mb,
    int8_body_packings,
    int8_form_files,
    int8_forms,
    int8_stem_packings,
    measure_latency,
    op_counts,
    ort_predict,
    ort_session,
    quantize_int8,
    quantize_model_int8,
    rank_int8_forms,
    store_block_diagonal_weights_compactly,
    takes_pixels,
)

SHAPE = (3, 4, 32, 32)  # [C, T, H, W]
# What the student may contain after export: BN folded into Conv, ReLU, pooling, the classifier, data movement
# (one Gather builds every frame's stem input: DeployedStudent).
STUDENT_OPS = {"Conv", "Relu", "AveragePool", "Gemm", "MatMul", "Reshape", "Transpose", "Flatten", "Gather"}


def _stored_clips(n: int, shape=SHAPE, seed: int = 0) -> torch.Tensor:
    """Random uint8 clips [n, T, H, W, C] as the pipeline stores them (`shape` = [C, T, H, W])."""
    c, t, h, w = shape
    return torch.randint(0, 256, (n, t, h, w, c), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _with_bn_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BN running stats (fresh ones are mean 0 / var 1), so a wrong BN fold shows in the logits."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, *SHAPE) * 2 + 0.5)
    return model.eval()


STUDENT_ARCH = StudentArch(frames=4, height=32, width=32, conv_widths=[8, 16, 16], conv_strides=[2, 2, 2],
                           temporal_widths=[16], num_classes=6)


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    return _with_bn_statistics(build_model(STUDENT_ARCH))


@pytest.fixture(scope="module")
def student_onnx(student, tmp_path_factory):
    return export_onnx(student, SHAPE, tmp_path_factory.mktemp("onnx") / "student.onnx")


def test_student_export_is_a_clean_graph_with_dynamic_batch_and_parity(student, student_onnx):
    model = onnx.load(str(student_onnx))
    ops = op_counts(student_onnx)
    assert set(ops) <= STUDENT_OPS, f"unexpected ops {set(ops) - STUDENT_OPS}"
    assert ops["Conv"] == 4 and "BatchNormalization" not in ops  # 3 Conv2d + 1 Conv1d, every BN folded in
    assert ops["Gather"] == 1  # the frame differences live in the stem's weights, not in Slice / Sub / Concat
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


@pytest.mark.parametrize("frame_differences", [True, False])
@pytest.mark.parametrize("channel_multiple, frames_per_stem", [(1, 1), (4, 1), (4, 2), (4, 4)])
@pytest.mark.parametrize("pool_as_conv", [False, True])
@pytest.mark.parametrize("pixel_input", [False, True])
def test_deployed_student_is_the_same_function(frame_differences, channel_multiple, frames_per_stem, pool_as_conv,
                                               pixel_input):
    torch.manual_seed(0)
    arch = StudentArch(frames=4, height=32, width=32, conv_widths=[8, 16], conv_strides=[2, 2], temporal_widths=[8],
                       frame_differences=frame_differences, num_classes=5)
    student = _with_bn_statistics(build_model(arch))
    deployed = DeployedStudent(student, channel_multiple, frames_per_stem, pool_as_conv, pixel_input).eval()
    stem = deployed.stem
    # One conv reads the planes of its frames (and, with differences, of the next frame): 6 -> 8 and 3 -> 4 planes
    # unpacked, 15 -> 16 and 12 with 4 frames per conv, + 1 constant plane for pixels; it writes the stem's 8 channels
    # for each of its frames.
    planes = 3 * (frames_per_stem + frame_differences)
    read = planes + pixel_input
    assert stem.in_channels == read + (-read) % channel_multiple
    assert stem.out_channels == 8 * frames_per_stem
    assert not stem.weight[:, read:].any()                               # padding planes are read with zero weights
    assert stem.weight[:, planes:read].any() == pixel_input               # the constant plane carries the mean shift
    for j in range(frames_per_stem):  # frame j of a group reads only its own planes and its next frame's
        block = stem.weight[8 * j:8 * (j + 1), :planes]
        assert not block[:, :3 * j].any() and not block[:, 3 * j + 3 * (1 + frame_differences):].any()
    assert student.encoder.convs[0][0].in_channels == arch.input_channels()  # the trained student is not touched
    stored = _stored_clips(3)                                               # uint8 [B, T, H, W, C]
    x = normalise_clips(stored)
    with torch.no_grad():   # pixels: the normalisation folded into the stem, borders included
        got = deployed(stored.movedim(-1, 1).contiguous() if pixel_input else x)
        assert (got - student(x)).abs().max() < 1e-5


def test_pooling_as_a_depthwise_conv_averages_overlapping_windows():
    """28 px: a 7x7 final map pooled to 2x2 by overlapping 4x4 windows (stride 3), as a conv of constant weights."""
    torch.manual_seed(0)
    arch = StudentArch(frames=4, height=28, width=28, conv_widths=[8, 16], conv_strides=[2, 2], temporal_widths=[8],
                       num_classes=5)
    student = _with_bn_statistics(build_model(arch))
    deployed = DeployedStudent(student, pool_as_conv=True).eval()
    assert isinstance(deployed.pool, torch.nn.Conv2d) and deployed.pool.groups == 16
    assert deployed.pool.kernel_size == (4, 4) and deployed.pool.stride == (3, 3)
    x = torch.randn(3, 3, 4, 28, 28)
    with torch.no_grad():
        assert (deployed(x) - student(x)).abs().max() < 1e-5


@pytest.mark.parametrize("frames_per_stem", [2, 4])
@pytest.mark.parametrize("packed_body", [1, 2])
@pytest.mark.parametrize("pool_as_conv", [False, True])
def test_packed_body_is_the_same_function(student, frames_per_stem, packed_body, pool_as_conv):
    """The body convs after a packed stem run on the packed frames: block-diagonal, each frame's block its own."""
    deployed = DeployedStudent(student, 4, frames_per_stem, pool_as_conv, True, packed_body).eval()
    assert len(deployed.packed) == packed_body and len(deployed.body) == 2 - packed_body
    for i, block in enumerate(deployed.packed):
        weight, (out, cin) = block[0].weight, student.encoder.convs[i + 1][0].weight.shape[:2]
        assert weight.shape[:2] == (frames_per_stem * out, frames_per_stem * cin)
        for j in range(frames_per_stem):   # off the diagonal, frame j's outputs read nothing of the other frames
            rows = weight[j * out:(j + 1) * out]
            assert rows[:, j * cin:(j + 1) * cin].any()
            assert not rows[:, :j * cin].any() and not rows[:, (j + 1) * cin:].any()
    stored = _stored_clips(3)
    with torch.no_grad():
        got = deployed(stored.movedim(-1, 1).contiguous())
        assert (got - student(normalise_clips(stored))).abs().max() < 1e-5


@pytest.mark.parametrize("frames_per_stem", [2, 4])
@pytest.mark.parametrize("pool_as_conv", [False, True])
def test_grouped_body_is_the_same_function(student, frames_per_stem, pool_as_conv):
    """Every body conv after a packed stem runs on the packed frames as one grouped conv (a frame per group), and
    the frames are unpacked only in the features."""
    deployed = DeployedStudent(student, 4, frames_per_stem, pool_as_conv, True, grouped_body=True).eval()
    assert len(deployed.packed) == 2 and len(deployed.body) == 0
    for i, block in enumerate(deployed.packed):
        conv, original = block[0], student.encoder.convs[i + 1][0]
        assert conv.groups == frames_per_stem and conv.out_channels == frames_per_stem * original.out_channels
    stored = _stored_clips(3)
    with torch.no_grad():
        got = deployed(stored.movedim(-1, 1).contiguous())
        assert (got - student(normalise_clips(stored))).abs().max() < 1e-5
    with pytest.raises(ValueError, match="grouped_body needs frames packed into the stem"):
        DeployedStudent(student, 4, frames_per_stem=1, grouped_body=True)


@pytest.mark.parametrize("stem_kernel, padding", [(4, 0), (5, 2)])
@pytest.mark.parametrize("frames_per_stem, packed_body, grouped_body", [(1, 0, False), (4, 0, False), (4, 1, False),
                                                                         (4, 0, True)])
def test_a_stride_4_stem_deploys_as_the_same_function(stem_kernel, padding, frames_per_stem, packed_body,
                                                      grouped_body):
    """4x4 patches unpadded, or 5x5 windows padded by 2: the constant plane that carries the pixels' normalisation
    must count exactly the taps inside the frame either way."""
    torch.manual_seed(0)
    arch = StudentArch(frames=4, height=32, width=32, conv_widths=[8, 16, 16], conv_strides=[4, 1, 2],
                       stem_kernel=stem_kernel, temporal_widths=[16], num_classes=6)
    student = _with_bn_statistics(build_model(arch))
    deployed = DeployedStudent(student, 4, frames_per_stem, True, True, packed_body, grouped_body).eval()
    assert deployed.stem.kernel_size == (stem_kernel,) * 2 and deployed.stem.padding == (padding,) * 2
    stored = _stored_clips(3)
    with torch.no_grad():
        got = deployed(stored.movedim(-1, 1).contiguous())
        assert (got - student(normalise_clips(stored))).abs().max() < 1e-5


def test_stem_packing_must_divide_the_frames(student):
    with pytest.raises(ValueError, match="frames_per_stem=3 does not divide"):
        DeployedStudent(student, 4, frames_per_stem=3)
    with pytest.raises(ValueError, match="packed_body=1 needs frames packed into the stem"):
        DeployedStudent(student, 4, frames_per_stem=1, packed_body=1)
    with pytest.raises(ValueError, match="packed_body=3 needs .* at most the 2 convs after it"):
        DeployedStudent(student, 4, frames_per_stem=4, packed_body=3)


@pytest.mark.parametrize("stem_width, frames, expected", [(16, 8, [1, 4]), (16, 6, [1, 3]), (32, 8, [1, 2]),
                                                          (64, 8, [1]), (16, 5, [1])])
def test_int8_stem_packings_fill_one_pass_of_the_int8_conv(stem_width, frames, expected):
    arch = StudentArch(frames=frames, height=16, width=16, conv_widths=[stem_width, 16], conv_strides=[2, 2],
                       temporal_widths=[8], num_classes=3)
    assert int8_stem_packings(build_model(arch)) == expected
    # each packing with both poolings, then a packed stem with its one body conv packed too (16 x G <= 64), then
    # with its whole body grouped
    assert [(form["frames_per_stem"], form.get("packed_body", 0), form.get("grouped_body", False))
            for form in int8_forms(build_model(arch))] == \
        [(g, 0, False) for g in expected for _ in "ab"] + [(g, 1, False) for g in expected if g > 1] + \
        [(g, 0, True) for g in expected if g > 1]
    teacher = build_model(TeacherArch(arch="r3d_18", width=0.125, num_classes=3))
    assert int8_stem_packings(teacher) == [1] and int8_forms(teacher) == [{}]


def test_a_student_without_a_pool_gets_no_pooling_forms():
    """A final map already grid x grid is not pooled (FrameEncoder), so there is no pool to run as a conv."""
    arch = StudentArch(frames=8, height=16, width=16, conv_widths=[16, 16], conv_strides=[4, 2], stem_kernel=5,
                       temporal_widths=[8], pool_grid=2, num_classes=3)
    model = build_model(arch)
    assert isinstance(model.encoder.pool, torch.nn.Identity)
    assert [form["pool_as_conv"] for form in int8_forms(model)] == [False] * 4   # G = 1, 4; 4 + body; 4 grouped
    deployed = DeployedStudent(model, 4, 4, pool_as_conv=True, pixel_input=True).eval()
    assert isinstance(deployed.pool, torch.nn.Identity)


@pytest.mark.parametrize("body_widths, frames_per_stem, expected", [([16, 16, 48], 4, [1, 2]), ([16, 16, 48], 2, [1, 2]),
                                                                   ([16, 32, 32], 4, [1]), ([32, 32], 2, [1, 2]),
                                                                   ([48, 16], 4, [])])
def test_int8_body_packings_stop_at_the_first_conv_wider_than_one_pass(body_widths, frames_per_stem, expected):
    arch = StudentArch(frames=8, height=32, width=32, conv_widths=[16, *body_widths],
                       conv_strides=[2] * (1 + len(body_widths)), temporal_widths=[8], num_classes=3)
    assert int8_body_packings(build_model(arch), frames_per_stem) == expected


def _upstream_ops(model: onnx.ModelProto, node: onnx.NodeProto) -> list[str]:
    produced_by = {out: n for n in model.graph.node for out in n.output}
    upstream, frontier = [], [node.input[0]]
    while frontier:
        producer = produced_by.get(frontier.pop())
        if producer is not None:
            upstream.append(producer.op_type)
            frontier += list(producer.input)
    return upstream


def _weights(model: onnx.ModelProto, data_type: int) -> list[onnx.TensorProto]:
    return [t for t in model.graph.initializer if t.data_type == data_type and len(t.dims) >= 2]  # 1-D: zero points


def test_int8_quantization_is_qdq_smaller_and_close_to_fp32(student, student_onnx, tmp_path):
    calibration = [_stored_clips(8, seed=i) for i in range(4)]
    int8 = quantize_model_int8(student, SHAPE, tmp_path / "int8.onnx", calibration)
    ops = op_counts(int8)
    assert ops.get("QuantizeLinear", 0) >= 4 and ops.get("DequantizeLinear", 0) >= 4
    # Every weight is stored as int8 (1 byte per element instead of 4), the stem's too: its 6 input channels are padded
    # to 8 for the fast int8 kernel. On a model this small names and scales weigh too: check the weights, not the file.
    model = onnx.load(str(int8))
    assert not _weights(model, onnx.TensorProto.FLOAT)
    int8_weights = _weights(model, onnx.TensorProto.INT8)
    # 3 Conv2d, Conv1d, Linear; and the pooling's depthwise conv [C, 1, k, k] where that form was the faster
    assert len([t for t in int8_weights if t.dims[1] != 1]) == 5 and len(int8_weights) in (5, 6)
    # The stem is whichever int8 form was faster here: one frame per conv (6 planes + the constant one, padded to 8
    # in, 8 out), or 4 frames per conv (15 planes + the constant one in, 4 x 8 out).
    assert {(8, 8, 3, 3), (32, 16, 3, 3)} & {tuple(t.dims) for t in int8_weights}
    assert file_mb(int8) < file_mb(student_onnx)
    # It reads uint8 pixels, and they reach the int8 stem as they came: gathered, never quantized again.
    assert takes_pixels(model) and not takes_pixels(onnx.load(str(student_onnx)))
    stem = next(n for n in model.graph.node if n.op_type == "Conv")
    upstream = _upstream_ops(model, stem)
    assert "Gather" in upstream and "QuantizeLinear" not in upstream and "Cast" not in upstream, upstream
    # the logits leave the classifier in float (onnxruntime's QGemm writes them): no quantize / dequantize after it
    assert next(n for n in model.graph.node if n.output[0] == model.graph.output[0].name).op_type == "Gemm"

    stored = _stored_clips(16, seed=9)
    fp32 = ort_predict(ort_session(student_onnx), [stored])   # normalised for the fp32 file, pixels for int8
    quantized = ort_predict(ort_session(int8), [stored])
    # int8 noise is a few percent of the logits' spread on data like the calibration data; a wrong scale is not.
    assert np.abs(quantized - fp32).mean() < 0.1 * fp32.std()


def test_packed_body_weights_are_stored_as_one_block_and_run_the_same(student, tmp_path):
    from workers.onnx_passes import _fold_constant_weights

    calibration = [_stored_clips(8, seed=i) for i in range(2)]
    form = {"channel_multiple": 4, "frames_per_stem": 4, "pool_as_conv": True, "pixel_input": True}
    unpacked = quantize_int8(export_onnx(student, SHAPE, tmp_path / "s0.onnx", **form), tmp_path / "unpacked.onnx",
                             calibration)
    packed = quantize_int8(export_onnx(student, SHAPE, tmp_path / "s2.onnx", **form, packed_body=2),
                           tmp_path / "packed.onnx", calibration)
    model = onnx.load(str(packed))
    blocks = [t for t in model.graph.initializer if t.name.endswith("_block")]
    # both body convs [16, 8] and [16, 16] packed by 4, stored as their one block: the file weighs what the
    # unpacked form does (a few names and scales more), not the 4x of its full weights
    assert sorted(tuple(t.dims) for t in blocks) == [(16, 8, 3, 3), (16, 16, 3, 3)]
    assert op_counts(packed)["Concat"] == 2 and op_counts(packed)["Pad"] == 8 + 1   # + the pixels' constant plane
    assert file_mb(packed) < 1.1 * file_mb(unpacked)
    stored = _stored_clips(8, seed=9)
    compact_logits = ort_predict(ort_session(packed), [stored])
    _fold_constant_weights(model.graph)   # the whole block-diagonal weights, as TensorRT gets them
    whole = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("_quantized")
             and len(t.dims) == 4 and t.dims[0] == 64 and t.dims[1] > 1]   # not the pooling's depthwise conv
    assert len(whole) == 2
    for w in whole:   # 4 equal blocks on the diagonal, zeros elsewhere
        out, cin = w.shape[0] // 4, w.shape[1] // 4
        assert np.array_equal(w, np.kron(np.eye(4, dtype=np.int8)[:, :, None, None], w[:out, :cin]))
    onnx.save(model, str(tmp_path / "whole.onnx"))
    assert np.array_equal(ort_predict(ort_session(tmp_path / "whole.onnx"), [stored]), compact_logits)
    assert file_mb(tmp_path / "whole.onnx") > 1.5 * file_mb(packed)


def test_compact_storage_rewrites_only_exact_block_diagonals_and_a_shared_weight_once():
    from onnx import TensorProto, helper, numpy_helper
    block = np.arange(1, 1 + 2 * 3 * 3 * 3, dtype=np.int8).reshape(2, 3, 3, 3)
    diagonal = np.kron(np.eye(2, dtype=np.int8)[:, :, None, None], block)             # [4, 6, 3, 3]
    almost = diagonal.copy()
    almost[0, 5, 0, 0] = 1                                                              # one weight off the diagonal
    inits = [numpy_helper.from_array(diagonal, "w"), numpy_helper.from_array(almost, "v"),
             numpy_helper.from_array(np.array(0.1, np.float32), "s")]
    nodes = [helper.make_node("DequantizeLinear", [w, "s"], [f"{w}{i}"], name=f"dq_{w}{i}")
             for w, i in (("w", 0), ("w", 1), ("v", 0))]
    outputs = [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, [4, 6, 3, 3]) for n in nodes]
    model = helper.make_model(helper.make_graph(nodes, "g", [], outputs, inits),
                              opset_imports=[helper.make_opsetid("", OPSET)])
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {})
    compact = store_block_diagonal_weights_compactly(model)
    onnx.checker.check_model(compact, full_check=True)
    ops = [n.op_type for n in compact.graph.node]
    assert ops.count("Concat") == 1 and ops.count("Pad") == 2   # w once, though two nodes read it; v untouched
    assert {t.name for t in compact.graph.initializer} >= {"w_block", "v"} and "w" not in {
        t.name for t in compact.graph.initializer}
    got = ort.InferenceSession(compact.SerializeToString()).run(None, {})
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))


def test_int8_weights_compute_the_same_on_every_x86_kernel(student, tmp_path):
    """Without VNNI onnxruntime's u8 x s8 kernels add pairs of products in int16 (VPMADDUBSW) and saturate unless the
    weights have 7 bits: then the fused int8 kernels compute what the QDQ graph means, as VNNI kernels do."""
    calibration = [_stored_clips(8, seed=i) for i in range(2)]
    int8 = quantize_model_int8(student, SHAPE, tmp_path / "int8.onnx", calibration)
    weights = [onnx.numpy_helper.to_array(t) for t in _weights(onnx.load(str(int8)), onnx.TensorProto.INT8)]
    assert weights and max(int(np.abs(w.astype(np.int32)).max()) for w in weights) <= INT8_WEIGHT_MAX
    stored = _stored_clips(16, seed=9)   # random pixels over the whole 0..255: the stem's worst case
    fused = ort_predict(ort_session(int8), [stored])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # Q / DQ / float ops, as written
    simulated = ort_predict(ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"]), [stored])
    # Rounding differs by a step of a quantized tensor here and there (mean |difference| 1.3e-4 of the logits'
    # spread on an AVX2 CPU); with 8-bit weights that CPU's int16 saturation made it 3.8e-3 on this small model, and
    # cost the demo's pruned student 6 points of test top-1.
    assert np.abs(fused - simulated).mean() < 1e-3 * simulated.std()


def test_int8_forms_are_kept_for_a_target_to_rank_again(student, tmp_path):
    calibration = [_stored_clips(8, seed=i) for i in range(2)]
    int8 = quantize_model_int8(student, SHAPE, tmp_path / "int8.onnx", calibration, forms_dir=tmp_path / "forms")
    forms = int8_form_files(tmp_path / "forms")
    index = json.loads((tmp_path / "forms" / FORMS_INDEX).read_text())
    # one file per form, in int8_forms' order, each timed here; the kept file is the chosen form's, byte for byte
    assert list(forms) == [", ".join(f"{k}={v}" for k, v in form.items()) for form in int8_forms(student)]
    assert all(form["best_p50_ms"] > 0 for form in index["forms"])
    assert forms[index["chosen"]].read_bytes() == int8.read_bytes()
    # the form that does the least work (for a GPU compiler): nothing packed, an average pool
    assert int8_forms(student)[0] == {"frames_per_stem": 1, "pool_as_conv": False, "pixel_input": True}
    assert fewest_macs_int8_form(tmp_path / "forms") == next(iter(forms.values()))
    assert all(takes_pixels(onnx.load(str(path))) for path in forms.values())
    # ranking them again (as a target does) times every form and picks the quickest of its own timings
    chosen, times = rank_int8_forms(forms, SHAPE, threads=1)
    assert set(times) == set(forms) and chosen == min(times, key=times.get)
    assert rank_int8_forms({"only": int8}, SHAPE, threads=1) == ("only", {})   # nothing to rank, nothing timed
    # an index pointing outside its folder (a tampered model dir) is refused, naming the form and the file
    index["forms"][0]["file"] = "../int8.onnx"
    (tmp_path / "forms" / FORMS_INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"names the file '\.\./int8\.onnx', which is not a plain file name"):
        int8_form_files(tmp_path / "forms")
    (tmp_path / "forms" / FORMS_INDEX).write_text('{"forms": [{"file": "form_0.onnx"}]}')   # no name
    with pytest.raises(ValueError, match=r"forms\.json: not an index of int8 forms \(KeyError"):
        int8_form_files(tmp_path / "forms")
    (tmp_path / "forms" / FORMS_INDEX).write_text('{"forms": []}')   # an empty index: nothing a target could ship
    with pytest.raises(ValueError, match=r"forms\.json: the index names no int8 forms"):
        int8_form_files(tmp_path / "forms")
    # kept again (a QAT pass re-quantizes): replaced whole, no staging folder left behind
    quantize_model_int8(student, SHAPE, tmp_path / "int8.onnx", calibration, forms_dir=tmp_path / "forms")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forms", "int8.onnx"]


def negate_int8_classifier(path) -> None:
    """Flip the sign of an int8 file's classifier, weights (int8 [classes, features], 7 bits: -w stays in range) and
    bias (int32), so its logits are negated and its argmax is the reference's argmin, also where the bias decides."""
    from onnx import numpy_helper
    model = onnx.load(str(path))
    producer = {out: node for node in model.graph.node for out in node.output}
    gemm = next(node for node in model.graph.node if node.op_type == "Gemm")
    quantized = {producer[name].input[0] for name in gemm.input[1:]}   # each a DequantizeLinear of an initializer
    for tensor in model.graph.initializer:
        if tensor.name in quantized:
            tensor.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(tensor), tensor.name))
    onnx.save(model, str(path))


def test_forms_below_the_agreement_budget_are_left_out(student, tmp_path):
    calibration = [_stored_clips(8, seed=i) for i in range(2)]
    quantize_model_int8(student, SHAPE, tmp_path / "int8.onnx", calibration, forms_dir=tmp_path / "forms")
    forms = int8_form_files(tmp_path / "forms")
    broken = next(iter(forms))
    negate_int8_classifier(forms[broken])
    clips = [_stored_clips(16, seed=7 + i) for i in range(2)]
    with torch.no_grad():
        reference = torch.cat([student(normalise_clips(x)) for x in clips]).numpy()
    within, agreement = faithful_int8_forms(forms, clips, reference, min_agreement=0.75)
    assert set(agreement) == set(forms) and agreement[broken] < 0.75
    assert within == [name for name in forms if name != broken] and all(agreement[n] >= 0.75 for n in within)
    # none within the budget: the most faithful alone, so there is always something to ship and a gate to refuse it
    assert faithful_int8_forms(forms, clips, reference, min_agreement=1.01)[0] == [max(agreement, key=agreement.get)]


def test_quantize_keeps_the_fastest_form_within_the_agreement_budget(student, tmp_path):
    calibration = [_stored_clips(8, seed=i) for i in range(2)]
    clips = [_stored_clips(16, seed=7)]
    with torch.no_grad():
        reference = student(normalise_clips(clips[0])).numpy()
    int8 = quantize_model_int8(student, SHAPE, tmp_path / "int8.onnx", calibration, forms_dir=tmp_path / "forms",
                               eval_batches=clips, reference=reference, min_agreement=0.5)
    index = json.loads((tmp_path / "forms" / FORMS_INDEX).read_text())
    scored = {form["name"]: form for form in index["forms"]}
    assert all(0.5 <= form["argmax_agreement"] <= 1 for form in scored.values())   # every form scored, all within
    timed = {name: form["best_p50_ms"] for name, form in scored.items()}
    assert index["chosen"] == min(timed, key=timed.get)
    assert int8_form_files(tmp_path / "forms")[index["chosen"]].read_bytes() == int8.read_bytes()
    # an impossible budget: nothing is ranked (so nothing timed), and the most faithful form is the one kept
    quantize_model_int8(student, SHAPE, tmp_path / "int8.onnx", calibration, forms_dir=tmp_path / "forms",
                        eval_batches=clips, reference=reference, min_agreement=1.01)
    index = json.loads((tmp_path / "forms" / FORMS_INDEX).read_text())
    agreement = {form["name"]: form["argmax_agreement"] for form in index["forms"]}
    assert all(form["best_p50_ms"] is None for form in index["forms"])
    assert agreement[index["chosen"]] == max(agreement.values())
    with pytest.raises(ValueError, match="needs both eval_batches and reference"):
        quantize_model_int8(student, SHAPE, tmp_path / "int8.onnx", calibration, eval_batches=clips)


def test_int8_source_that_is_not_the_model_is_refused(student, tmp_path, monkeypatch):
    """The padded form quantization starts from is checked against PyTorch: a padding plane read with a non-zero
    weight (a wrong inference form) stops quantization before an int8 model is written."""
    class WrongPadding(DeployedStudent):
        def __init__(self, model, *args, **kwargs):
            super().__init__(model, *args, **kwargs)
            with torch.no_grad():
                self.stem.weight[:, -1] += 0.5

    with pytest.raises(ValueError, match="no calibration batches"):
        quantize_model_int8(student, SHAPE, tmp_path / "int8.onnx", [])
    with pytest.raises(ValueError, match="reads uint8 pixels: pass the stored uint8 clips"):
        quantize_model_int8(student, SHAPE, tmp_path / "int8.onnx", [torch.randn(4, *SHAPE)])
    monkeypatch.setattr("vidopt.onnx_utils.DeployedStudent", WrongPadding)
    with pytest.raises(ExportParityError, match="differs from PyTorch"):
        quantize_model_int8(student, SHAPE, tmp_path / "int8.onnx", [_stored_clips(4)])
    assert not (tmp_path / "int8.onnx").exists()


def _cast_quantize_graph(scale: float, zero_point: int) -> onnx.ModelProto:
    """uint8 pixels -> Cast(float) -> QuantizeLinear(scale, zero point) -> DequantizeLinear -> Relu, [1, 4]."""
    from onnx import TensorProto, helper, numpy_helper
    nodes = [helper.make_node("Cast", ["pixels"], ["as_float"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("QuantizeLinear", ["as_float", "s", "z"], ["q"], name="quantize"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"], name="dequantize"),
             helper.make_node("Relu", ["dq"], ["out"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("pixels", TensorProto.UINT8, [1, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(np.array(scale, np.float32), "s"),
                               numpy_helper.from_array(np.array(zero_point, np.uint8), "z")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def test_pixel_requantization_is_dropped_only_where_it_is_the_identity(tmp_path):
    model = drop_pixel_requantization(_cast_quantize_graph(1.0, 0))
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", "Relu"]
    onnx.save(model, str(tmp_path / "dropped.onnx"))
    pixels = np.array([[0, 1, 128, 255]], np.uint8)
    out = ort_session(tmp_path / "dropped.onnx").run(None, {"pixels": pixels})[0]
    np.testing.assert_array_equal(out, pixels.astype(np.float32))
    with pytest.raises(ValueError, match="scale 0.5 and zero point 0 .* not 1 and 0"):
        drop_pixel_requantization(_cast_quantize_graph(0.5, 0))
    with pytest.raises(ValueError, match="no Cast\\(uint8\\) -> QuantizeLinear pair"):
        drop_pixel_requantization(drop_pixel_requantization(_cast_quantize_graph(1.0, 0)))


def _stem_constant_offset(model: onnx.ModelProto, constant_plane: int) -> np.ndarray:
    """Per stem output channel, what the constant plane and the bias add where every tap is in the frame: PIXEL_MAX
    x the sum of the plane's weights over the taps, plus the bias (dequantized in an int8 model). [O]"""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    stem = next(n for n in model.graph.node if n.op_type == "Conv")

    def value(name: str) -> np.ndarray:
        if name in inits:
            return inits[name].astype(np.float64)
        q, scale = (inits[i] for i in producer[name].input[:2])   # scale [O] (axis 0) or one per tensor
        return q.astype(np.float64) * (scale.reshape(-1, *[1] * (q.ndim - 1)) if scale.ndim else scale)

    bias = value(stem.input[2]) if len(stem.input) > 2 and stem.input[2] else 0.0
    return PIXEL_MAX * value(stem.input[1])[:, constant_plane].sum(axis=(1, 2)) + bias


# untrained: an all-zero stem bias, which export drops; per_channel False: one weight scale per tensor
@pytest.mark.parametrize("trained_bn, per_channel", [(True, True), (False, True), (True, False)])
def test_constant_plane_rounding_comes_off_the_stem_bias(student, trained_bn, per_channel, tmp_path, monkeypatch):
    model = student if trained_bn else build_model(STUDENT_ARCH).eval()
    source = export_onnx(model, SHAPE, tmp_path / "pixels.onnx", channel_multiple=4, pixel_input=True)
    calibration = [_stored_clips(8, seed=i) for i in range(4)]
    corrected = quantize_int8(source, tmp_path / "corrected.onnx", calibration, per_channel)
    monkeypatch.setattr("vidopt.onnx_utils.correct_constant_plane_rounding", lambda quantized, _: quantized)
    plain = quantize_int8(source, tmp_path / "plain.onnx", calibration, per_channel)
    # One frame per stem conv: planes 0-5 the frame and its next one, 6 the constant plane, 7 padding
    exact = _stem_constant_offset(onnx.load(str(source)), 6)
    offsets = {name: _stem_constant_offset(onnx.load(str(path)), 6) for name, path in
               (("plain", plain), ("corrected", corrected))}
    stem = next(n for n in onnx.load(str(corrected)).graph.node if n.op_type == "Conv")
    bias_scale = next(onnx.numpy_helper.to_array(t) for t in onnx.load(str(corrected)).graph.initializer
                      if t.name == next(n for n in onnx.load(str(corrected)).graph.node
                                        if n.output[0] == stem.input[2]).input[1])
    # corrected: exact up to the int32 bias's own rounding; the plain quantizer is off by many bias steps
    assert np.all(np.abs(offsets["corrected"] - exact) <= 0.51 * bias_scale)
    assert np.abs(offsets["plain"] - exact).max() > 5 * bias_scale.max()
    if not trained_bn:
        return   # an untrained model's logits hardly depend on its stem: the offsets are the check
    # and the logits are closer to fp32 (pixels as the pipeline stores them)
    stored = _stored_clips(16, seed=9)
    fp32 = ort_predict(ort_session(source), [stored])
    errors = {name: np.abs(ort_predict(ort_session(path), [stored]) - fp32).mean()
              for name, path in (("plain", plain), ("corrected", corrected))}
    assert errors["corrected"] < errors["plain"], errors


def test_constant_plane_correction_needs_the_pixel_gather(student, tmp_path):
    source = onnx.load(str(export_onnx(student, SHAPE, tmp_path / "float.onnx", channel_multiple=4)))
    with pytest.raises(ValueError, match="constant plane"):
        correct_constant_plane_rounding(source, source)


def test_int8_keeps_a_conv_without_fast_kernel_and_its_input_path_in_fp32(student, student_onnx, tmp_path):
    """An unpadded stem (6 input channels) has no fast int8 kernel: it stays fp32, with everything only feeding it,
    and quantization starts at its output."""
    int8 = quantize_int8(student_onnx, tmp_path / "int8.onnx", [_stored_clips(8, seed=i) for i in range(2)])
    model = onnx.load(str(int8))
    assert [list(t.dims) for t in _weights(model, onnx.TensorProto.FLOAT)] == [[8, 6, 3, 3]]
    assert len(_weights(model, onnx.TensorProto.INT8)) == 4
    stem = next(n for n in model.graph.node if n.op_type == "Conv")
    upstream = _upstream_ops(model, stem)
    assert "Gather" in upstream and not {"QuantizeLinear", "DequantizeLinear"} & set(upstream), upstream


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
    assert timed["big"]["best_p50_ms"] > 3 * timed["small"]["best_p50_ms"]
    assert all(0 < t["best_p50_ms"] <= t["p50_ms"] for t in timed.values())  # the lowest round's p50 <= the median
