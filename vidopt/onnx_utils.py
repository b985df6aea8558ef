"""ONNX export, onnxruntime inference, static int8 quantization and latency measurement on CPU.

Export uses torch.onnx's dynamo exporter: its optimizer folds eval-mode BatchNorm into the convolutions and keeps the
student's reshapes as constant-shape Reshape nodes, so the graph is Conv/Relu/AveragePool/Gemm plus data movement. The
TorchScript exporter leaves Shape/Gather/Concat chains computing the same reshape targets at run time.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

from vidopt.data import normalise_clips
from vidopt.models import PIXEL_MAX, DeployedStudent, Student, has_pool
from vidopt.storage import atomic_dir, atomic_path
from vidopt.timing import interleaved, time_calls

log = logging.getLogger("vidopt.onnx_utils")

INPUT_NAME, OUTPUT_NAME = "clips", "logits"
OPSET = 18  # the dynamo exporter's native opset (per-channel QDQ needs >= 13)
# Activations uint8, weights int8: onnxruntime's recommendation for x86 with VNNI (u8 x s8 is what VPDPBUSD
# multiplies). Measured here against int8 activations on the student at 16x64x64 and 16x112x112: same accuracy
# (asymmetric ranges give ReLU outputs the same 256 levels either way) and speed within +-5%, neither consistently
# ahead, so the documented choice stands.
ACTIVATION_TYPE = QuantType.QUInt8
# Weights in 7 bits ([-64, 64]: onnxruntime's reduce_range), so the file computes the same integers on every x86 CPU.
# Without VNNI (AVX2, AVX-512F) onnxruntime multiplies u8 x s8 with VPMADDUBSW, which adds each pair of products in
# int16 and saturates: 2 x 255 x 127 overflows it, 2 x 255 x 64 does not. On an AMD EPYC (Zen 3, AVX2) the demo's
# pruned student in int8 with 8-bit weights scored 89.3% test top-1 (fp32 95.4%), argmax agreement 0.914; with 7-bit
# weights 95.9%, 0.995, at the same speed. Without saturation (VNNI, or the QDQ graph run in float) 8-bit weights gave
# 96.4% and 0.990 on that model: the extra bit bought nothing measurable (one test clip is 0.5 points).
INT8_WEIGHT_MAX = 64   # what reduce_range gives symmetric int8 weights; QAT fake-quantizes to the same grid
# MinMax: on a student trained on the demo data (16x64x64, 64 calibration clips; weak, 21% val top-1 on 8 classes,
# but with trained activations) MinMax, Percentile (99.999) and Entropy gave exactly the fp32 top-1 on val and test,
# argmax agreement 98-100% (one val clip in 53 apart) and mean logit error 1.0% of the logits' spread, while
# Percentile / Entropy calibrated 4-5x slower. Nothing measurable to gain: the simplest, fastest method wins.
CALIBRATION = CalibrationMethod.MinMax
# MLAS's fast int8 convolution (symmetric, VNNI) needs input channels divisible by 4 (and >= 16 output channels:
# prune.channel_multiple); other convs fall back to im2col + GEMM, which for a 3-channel RGB stem was 2.5x slower than
# the fp32 conv and ate every gain of the other layers. So a student's stem is exported for int8 with its input padded
# to a multiple of 4 (DeployedStudent), and its frame pairs enter it as 8-bit planes (quantized at the input then;
# uint8 pixels now): on the demo's pruned student ([16, 16, 32, 48], 8x64x64) that made int8 1.25-1.3x faster than its
# fp32 where a stem kept in fp32 gave ~1.0x, test top-1 within 0.5 points, argmax agreement 0.995-1.0. Any other conv
# whose input channels do not fit stays fp32.
FAST_INT8_CHANNEL_MULTIPLE = 4
PARITY_TOLERANCE = 1e-4  # max |logit| difference allowed between PyTorch and an fp32 export on onnxruntime
# MLAS's int8 conv on AVX-512 (VNNI) computes up to 64 output channels per pass (KernelChannelCount in convsym.cpp) and
# pays per pixel and input channel, whatever the width: a 16-wide stem leaves 3/4 of each pass idle (`vidopt bench
# int8-widths`: int8 1.4x fp32 at width 16, 3.4x at 64). Packing 4 frames into the stem conv fills it: on the demo's
# pruned student int8 went from 1.32-1.34x to 1.50-1.59x its fp32 (8x64x64, batch 1, 1 thread); pooling with a
# depthwise conv as well, to 1.82-1.84x. On AVX2 the kernel works in 16-channel passes and packing would cost, so every
# form is timed and the fastest kept.
INT8_CONV_CHANNELS_PER_PASS = 64
# A model dir's folder of every int8 form quantize_model_int8 made (the CPU target ranks them again on its own
# machine), and the index in it naming each form and its file.
INT8_FORMS_DIR, FORMS_INDEX = "int8_forms", "forms.json"
FP32_FILE, INT8_FILE = "model_fp32.onnx", "model_int8.onnx"  # the quantize stage's model dir: its fp32 and int8 files
FORM_ROUNDS, FORM_MIN_SECONDS = 5, 0.1  # timing the int8 forms: ~3 s for the demo student (3 x 0.05 s misranked
# forms 10% apart on a loaded machine)

# torchvision registers detection ops (roi_align, nms) without type annotations, and the exporter warns about each on
# its first export in a process. This package exports none of them.
logging.getLogger("torch.onnx._internal.exporter._schemas").setLevel(logging.ERROR)
# The exporter's optimizer logs every pass at INFO (~20 lines per export), which buries a benchmark's own output.
for _name in ("onnx_ir", "onnxscript"):
    logging.getLogger(_name).setLevel(logging.WARNING)


def export_onnx(model: nn.Module, input_shape: Sequence[int], path: str | Path, dynamic_batch: bool = True,
                channel_multiple: int = 1, frames_per_stem: int = 1, pool_as_conv: bool = False,
                pixel_input: bool = False, packed_body: int = 0, grouped_body: bool = False) -> Path:
    """Export `model` in eval mode for input [B, C, T, H, W] (`input_shape` = [C, T, H, W]) to one self-contained
    .onnx file (no external weights file), checked with onnx.checker. Written atomically. A student is exported in
    its inference form (DeployedStudent: the same function, less data movement; `channel_multiple` pads its stem,
    `frames_per_stem` packs frames into one stem conv, `packed_body` the convs after it, `grouped_body` every conv
    after it as grouped convs, `pool_as_conv` pools with a depthwise conv)."""
    path = Path(path)
    was_training = model.training
    model.eval()
    exported = (DeployedStudent(model, channel_multiple, frames_per_stem, pool_as_conv, pixel_input, packed_body,
                                grouped_body) if isinstance(model, Student) else model)
    # Batch 2, not 1: torch.export specialises a dimension whose example size is 1 into a constant.
    shape, generator = (2 if dynamic_batch else 1, *input_shape), torch.Generator().manual_seed(0)
    example = (torch.randint(0, PIXEL_MAX + 1, shape, generator=generator, dtype=torch.uint8) if pixel_input
               else torch.randn(shape, generator=generator))
    dynamic = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    try:
        with atomic_path(path) as tmp, torch.no_grad():
            torch.onnx.export(exported, (example,), str(tmp), dynamo=True, external_data=False, opset_version=OPSET,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=dynamic,
                              verbose=False)
            onnx.checker.check_model(str(tmp), full_check=True)
    finally:
        model.train(was_training)
    return path


def ort_session(path: str | Path, threads: int = 1, profile_prefix: Path | None = None) -> ort.InferenceSession:
    """CPU session with `threads` intra-op threads, one inter-op thread and sequential execution: the model's ops
    run one after another, each split over `threads` cores, which is how a serving process pinned to N cores runs.
    With `profile_prefix`, onnxruntime's profiler times every node (end_profiling() writes its JSON there)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    if profile_prefix is not None:
        options.enable_profiling, options.profile_file_prefix = True, str(profile_prefix)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def takes_pixels(model: ort.InferenceSession | onnx.ModelProto) -> bool:
    """Whether the model's input is uint8 pixels (a student's int8 form: DeployedStudent(pixel_input=True)) rather
    than normalised float clips."""
    if isinstance(model, onnx.ModelProto):
        return model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    return model.get_inputs()[0].type == "tensor(uint8)"


def random_input(session: ort.InferenceSession, shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """A random input of `shape` for the session: uint8 pixels for a pixel model (takes_pixels), else standard
    normal floats (normalised clips)."""
    random = np.random.default_rng(seed)
    if takes_pixels(session):
        return random.integers(0, PIXEL_MAX + 1, tuple(shape), dtype=np.uint8)
    return random.standard_normal(tuple(shape), dtype=np.float32)


def model_input(batch, pixels: bool) -> np.ndarray:
    """What a model reads, from a batch of clips: stored uint8 clips [B, T, H, W, C] become uint8 [B, C, T, H, W]
    for a pixel model and normalised float [B, C, T, H, W] (normalise_clips) for the others; a float batch is taken
    as already normalised [B, C, T, H, W], which a pixel model cannot read."""
    batch = torch.as_tensor(batch)
    if batch.dtype == torch.uint8:
        return (batch.movedim(-1, 1).contiguous() if pixels else normalise_clips(batch)).numpy()
    if pixels:
        raise ValueError("this model reads uint8 pixels: pass the stored uint8 clips [B, T, H, W, C], not normalised "
                         f"float ones (got {batch.dtype} {tuple(batch.shape)})")
    return batch.detach().cpu().numpy().astype(np.float32)


def input_layout(pixels: bool) -> str:
    """The input contract, in words, for a deployment package's runtime description."""
    if pixels:
        return "[B, 3, T, H, W] uint8 RGB pixels as decoded (normalisation is folded into the model)"
    return ("[B, 3, T, H, W] float32, RGB scaled to [0, 1] then standardised with Kinetics mean/std "
            "(vidopt.data.normalise_clips)")


def ort_predict(session: ort.InferenceSession, batches: Iterable) -> np.ndarray:
    """Logits [N, classes] over batches of clips: stored uint8 [B, T, H, W, C] (converted to what the model reads:
    model_input) or normalised float [B, C, T, H, W]."""
    pixels = takes_pixels(session)
    outputs = [session.run([OUTPUT_NAME], {INPUT_NAME: model_input(x, pixels)})[0] for x in batches]
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)


class ClipCalibrationReader(CalibrationDataReader):
    """Feeds calibration batches (as ort_predict takes them) to onnxruntime's calibrator, once."""

    def __init__(self, batches: Iterable, pixels: bool):
        self._batches: Iterator = iter([model_input(x, pixels) for x in batches])

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


class ExportParityError(ValueError):
    """An exported model computes something else than the PyTorch model it came from."""


def check_parity(model: nn.Module, path: str | Path, batch: torch.Tensor, tolerance: float = PARITY_TOLERANCE) -> float:
    """Max |logit| difference between `model` (in eval mode) and its export at `path` on `batch` (stored uint8 clips
    or normalised float ones, as ort_predict takes them); raises ExportParityError above `tolerance`."""
    was_training = model.training
    with torch.no_grad():
        expected = model.eval()(normalise_clips(batch) if batch.dtype == torch.uint8 else batch).numpy()
    model.train(was_training)
    difference = float(np.abs(ort_predict(ort_session(path), [batch]) - expected).max())
    if difference > tolerance:
        raise ExportParityError(f"{path}: onnxruntime differs from PyTorch by {difference:.2e} (> {tolerance}); "
                                "the export is wrong, do not ship it")
    return difference


def int8_forms(model: nn.Module) -> list[dict]:
    """The inference forms quantize_model_int8 tries, as DeployedStudent options, the unpacked one first: every stem
    packing of int8_stem_packings, with the feature pooling as an average pool and as a depthwise conv (where the
    student pools at all: has_pool), each reading uint8 pixels; and for a packed stem, each packed body of
    int8_body_packings and the whole body grouped (each pooled by a depthwise conv). The grouped body never unpacks
    the frames until the features: OpenVINO runs a Reshape on planar maps, so unpacking the stem's output cost two
    layout reorders there (14% of the pruned student's time), while onnxruntime unpacks cheaply and its grouped
    int8 conv is slow. One plain form for other models."""
    if not isinstance(model, Student):
        return [{}]
    poolings = (False, True) if has_pool(model) else (False,)   # no pool: nothing to pool as a conv
    forms = [{"frames_per_stem": packing, "pool_as_conv": as_conv, "pixel_input": True}
             for packing in int8_stem_packings(model) for as_conv in poolings]
    return forms + [{"frames_per_stem": packing, "pool_as_conv": poolings[-1], "pixel_input": True,
                     "packed_body": layers}
                    for packing in int8_stem_packings(model) if packing > 1
                    for layers in int8_body_packings(model, packing)] + [
        {"frames_per_stem": packing, "pool_as_conv": poolings[-1], "pixel_input": True, "grouped_body": True}
        for packing in int8_stem_packings(model) if packing > 1 and len(model.encoder.convs) > 1]


def fewest_macs_int8_form(forms_dir: str | Path) -> Path:
    """The int8 file, of those quantize_model_int8 kept in `forms_dir`, that does the fewest multiply-adds: the first
    (int8_forms makes it first: frames unpacked, an average pool). What a GPU compiler wants: the packings fill
    onnxruntime's CPU int8 passes with zero weights, which TensorRT would multiply too."""
    return next(iter(int8_form_files(forms_dir).values()))


def int8_stem_packings(model: nn.Module) -> list[int]:
    """The frames_per_stem values quantize_model_int8 tries: 1, and for a student the most frames (dividing T) whose
    stems fill one pass of the int8 conv (INT8_CONV_CHANNELS_PER_PASS): 4 for a 16-wide stem."""
    if not isinstance(model, Student):
        return [1]
    packed = max(1, INT8_CONV_CHANNELS_PER_PASS // model.encoder.convs[0][0].out_channels)
    while model.frames % packed:
        packed -= 1
    return sorted({1, packed})


def int8_body_packings(model: Student, frames_per_stem: int) -> list[int]:
    """The packed_body values int8_forms tries after a stem packing G: 1 up to the leading body convs whose G packed
    blocks fit one pass of the int8 conv (G x width <= INT8_CONV_CHANNELS_PER_PASS): 1 and 2 for the old demo
    student's [16, 16, 16, 48] at G = 4, none for the present [16, 32, 32, 80]. A wider packed conv would do more
    passes on its G-times wider input."""
    fitting = 0
    for block in model.encoder.convs[1:]:
        if frames_per_stem * block[0].out_channels > INT8_CONV_CHANNELS_PER_PASS:
            break
        fitting += 1
    return list(range(1, fitting + 1))


def quantize_model_int8(model: nn.Module, input_shape: Sequence[int], int8_path: str | Path,
                        calibration_batches: Iterable, per_channel: bool = True,
                        forms_dir: str | Path | None = None, eval_batches: Sequence | None = None,
                        reference: np.ndarray | None = None, min_agreement: float = 0.0) -> Path:
    """`model` exported in its int8-ready forms (int8_forms: a student's stem input padded to
    FAST_INT8_CHANNEL_MULTIPLE, its frames packed into the stem conv or not, its feature pooling an average pool or a
    depthwise conv; a student's forms read uint8 pixels), each checked against PyTorch on the first calibration batch
    (check_parity) and quantized (quantize_int8); the fastest at batch 1 on 1 thread, on this machine (by its quietest
    round: compare_latency), is kept. Every form is the same function, so the choice changes speed only. The fp32
    model to compare it with is export_onnx(model): unpadded, unpacked and pooled, on normalised float input, the
    fastest fp32 form. `calibration_batches`: a student's as stored, uint8 [B, T, H, W, C].
    `forms_dir` keeps every form's int8 file there (FORMS_INDEX names them), so that a target can rank them again on
    its own hardware (int8_form_files, rank_int8_forms): the fastest form depends on the CPU's int8 kernels (64 or
    16 channels per pass) and on its load at the time.
    With `eval_batches` (as ort_predict takes them) and `reference` (the model's logits on them), only the forms
    whose argmax agreement is within `min_agreement` are ranked (faithful_int8_forms), so the file kept is one the
    registry's gate would pass where any form does; each form's agreement is kept in the index."""
    batches = [torch.as_tensor(x) for x in calibration_batches]
    if not batches:
        raise ValueError(f"quantize_model_int8 {int8_path}: no calibration batches; static int8 needs activation ranges")
    if (eval_batches is None) != (reference is None):
        raise ValueError(f"quantize_model_int8 {int8_path}: scoring the forms needs both eval_batches and reference")
    with tempfile.TemporaryDirectory(prefix="vidopt-int8-source-") as tmp:
        work, candidates = Path(tmp), {}
        for form in int8_forms(model):
            name = ", ".join(f"{k}={v}" for k, v in form.items()) or "plain"
            source = export_onnx(model, input_shape, work / f"source_{len(candidates)}.onnx",
                                 channel_multiple=FAST_INT8_CHANNEL_MULTIPLE, **form)
            check_parity(model, source, batches[0])
            candidates[name] = quantize_int8(source, work / f"int8_{len(candidates)}.onnx", batches, per_channel)
        eligible, agreement = list(candidates), {}
        if eval_batches is not None:
            eligible, agreement = faithful_int8_forms(candidates, eval_batches, reference, min_agreement)
        chosen, timed = rank_int8_forms({name: candidates[name] for name in eligible}, input_shape, threads=1)
        int8_path = Path(int8_path)
        if forms_dir is not None:
            _keep_forms(Path(forms_dir), candidates, timed, agreement, chosen)
        with atomic_path(int8_path) as out:
            shutil.copyfile(candidates[chosen], out)
    return int8_path


def rank_int8_forms(forms: dict[str, Path], input_shape: Sequence[int], threads: int) -> tuple[str, dict[str, float]]:
    """The fastest of several int8 files of one model at batch 1 on `threads` threads, on this machine, by each
    one's quietest round (compare_latency) -> (its name, {name: best round's p50 in ms}); nothing timed for one."""
    if len(forms) == 1:
        return next(iter(forms)), {}
    timed = compare_latency(forms, input_shape, batch=1, threads=threads, rounds=FORM_ROUNDS,
                            min_seconds=FORM_MIN_SECONDS)
    best = {name: stats["best_p50_ms"] for name, stats in timed.items()}
    chosen = min(best, key=best.get)
    log.info("int8 forms at %d thread(s) (best round's p50): %s", threads, "; ".join(
        f"{n} {ms:.3f} ms" + (" (kept)" if n == chosen else "") for n, ms in best.items()))
    return chosen, best


def faithful_int8_forms(forms: dict[str, Path], batches: Sequence, reference: np.ndarray,
                        min_agreement: float) -> tuple[list[str], dict[str, float]]:
    """Every form's argmax agreement with `reference` logits [N, classes] over `batches` (as ort_predict takes them)
    -> (the forms within `min_agreement`, or where none is the most faithful alone; {name: agreement}).

    The forms compute the same function but round differently in int8 (an average pool, or a depthwise conv of
    1 / window weights), so their agreement differs by a clip or two, which can straddle the registry's gate: in one
    demo run the fastest form agreed on 195 of 197 test clips (0.9898 < 0.99) and was not promoted where the others
    would have been. Scoring costs ~0.1 s a form on the demo's test clips."""
    agreement = {}
    for name, path in forms.items():
        logits = ort_predict(ort_session(path), batches)
        agreement[name] = float((logits.argmax(1) == reference.argmax(1)).mean())
    within = [name for name in forms if agreement[name] >= min_agreement]
    return within or [max(agreement, key=agreement.get)], agreement


def _keep_forms(forms_dir: Path, candidates: dict[str, Path], timed: dict[str, float], agreement: dict[str, float],
                chosen: str) -> None:
    """Every form's int8 file as form_<i>.onnx and FORMS_INDEX {"forms": [{name, file, best_p50_ms,
    argmax_agreement}], "chosen"} (timed and scored here, at 1 thread; null where a form was not), written whole or
    not at all (atomic_dir)."""
    with atomic_dir(forms_dir) as staging:
        index = []
        for i, (name, path) in enumerate(candidates.items()):
            shutil.copyfile(path, staging / f"form_{i}.onnx")
            index.append({"name": name, "file": f"form_{i}.onnx", "best_p50_ms": timed.get(name),
                          "argmax_agreement": agreement.get(name)})
        (staging / FORMS_INDEX).write_text(json.dumps({"forms": index, "chosen": chosen}, indent=2))


def int8_form_files(forms_dir: str | Path) -> dict[str, Path]:
    """{name: int8 file} of the forms quantize_model_int8 kept in `forms_dir`, in the order it made them. A model dir
    may come from elsewhere (a registry, a bucket): an index naming a file outside its folder is refused."""
    forms_dir = Path(forms_dir)
    try:
        files = {str(form["name"]): str(form["file"])
                 for form in json.loads((forms_dir / FORMS_INDEX).read_text())["forms"]}
    except (ValueError, KeyError, TypeError) as err:   # ValueError: not JSON
        raise ValueError(f"{forms_dir / FORMS_INDEX}: not an index of int8 forms "
                         f"({type(err).__name__}: {err})") from None
    if not files:   # nothing to rank or ship: faithful_int8_forms and rank_int8_forms need at least one form
        raise ValueError(f"{forms_dir / FORMS_INDEX}: the index names no int8 forms")
    for name, file in files.items():
        if Path(file).name != file or file in ("", ".", ".."):
            raise ValueError(f"{forms_dir / FORMS_INDEX}: form {name!r} names the file {file!r}, which is not a plain "
                             "file name in that folder")
    return {name: forms_dir / file for name, file in files.items()}


def quantize_int8(fp32_path: str | Path, int8_path: str | Path, calibration_batches: Iterable,
                  per_channel: bool = True, calibrate_method: CalibrationMethod = CALIBRATION,
                  activation_type: QuantType = ACTIVATION_TYPE) -> Path:
    """Static QDQ quantization: int8 weights in 7 bits (INT8_WEIGHT_MAX; per output channel if `per_channel`),
    activations of `activation_type` with ranges from the calibration batches; convs without a fast int8 kernel (and
    what only feeds them) stay fp32. Data movement at the input (Reshape / Gather) is quantized too
    (ForceQuantizeNoInputCheck), so a student's frame planes move as uint8 (a quarter of the bytes) straight into the
    int8 stem; a pixel source (takes_pixels) moves them as the uint8 pixels it reads, calibrated as such, and its
    pixels' re-quantization is dropped (drop_pixel_requantization). A packed body's block-diagonal weights are
    stored as one block each (store_block_diagonal_weights_compactly). The classifier's output (the logits) stays
    float: onnxruntime's QGemm then writes float itself, without a DequantizeLinear after it (1-3% of the demo's
    int8 latency in two 60-80-round A/Bs), and the logits are not rounded to 256 levels.
    onnxruntime's pre-processing (shape inference + graph optimisation) runs first: without it the QDQ graph keeps
    unfused patterns and int8 was barely faster than fp32 (DESIGN.md: 1.1x vs 2.3x at 1 thread)."""
    int8_path = Path(int8_path)
    with tempfile.TemporaryDirectory(prefix="vidopt-quant-") as work:
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        source = onnx.load(str(prepared))
        pixels = takes_pixels(source)
        with atomic_path(int8_path) as tmp:
            quantize_static(str(prepared), str(tmp), ClipCalibrationReader(calibration_batches, pixels),
                            quant_format=QuantFormat.QDQ, per_channel=per_channel, reduce_range=True,
                            activation_type=activation_type, weight_type=QuantType.QInt8,
                            calibrate_method=calibrate_method, nodes_to_exclude=kept_in_fp32(source),
                            extra_options={"ForceQuantizeNoInputCheck": True,
                                           "OpTypesToExcludeOutputQuantization": ["Gemm"]})
            quantized = onnx.load(str(tmp))
            if pixels:
                quantized = correct_constant_plane_rounding(drop_pixel_requantization(quantized), source)
            onnx.save(store_block_diagonal_weights_compactly(quantized), str(tmp))
            onnx.checker.check_model(str(tmp))
    return int8_path


def drop_pixel_requantization(model: onnx.ModelProto) -> onnx.ModelProto:
    """Cast(uint8 -> float) then QuantizeLinear(scale 1, zero point 0, uint8) is the identity on pixels 0..255: the
    pair the quantizer leaves where a pixel model's gathered planes enter the stem. Removed, the int8 stem reads the
    pixels as they came (onnxruntime's QuantizeLinear over the float clip was ~23 us of the demo int8 model's ~200).
    The calibrated scale is exactly 1 because the quantizer's range always includes 0 and the constant plane is 255;
    anything else is not the identity and raises."""
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    typed = onnx.shape_inference.infer_shapes(model).graph
    dropped = []
    for node in graph.node:
        cast = producer.get(node.input[0]) if node.op_type == "QuantizeLinear" else None
        to = next((a.i for a in cast.attribute if a.name == "to"), None) if cast and cast.op_type == "Cast" else None
        if to != onnx.TensorProto.FLOAT or not _uint8_tensor(typed, cast.input[0]):
            continue
        scale, zero = inits[node.input[1]], inits[node.input[2]]
        if float(scale) != 1.0 or int(zero) != 0 or zero.dtype != np.uint8:
            raise ValueError(f"{node.name}: pixels quantized with scale {float(scale)} and zero point {int(zero)} "
                             f"({zero.dtype}), not 1 and 0 (uint8): the calibration did not span 0..{PIXEL_MAX}")
        for user in graph.node:
            user.input[:] = [cast.input[0] if name == node.output[0] else name for name in user.input]
        dropped += [cast, node]
    if not dropped:
        raise ValueError("drop_pixel_requantization: no Cast(uint8) -> QuantizeLinear pair in this model")
    for node in dropped:
        graph.node.remove(node)
    return model


def correct_constant_plane_rounding(quantized: onnx.ModelProto, source: onnx.ModelProto) -> onnx.ModelProto:
    """A pixel model's stem reads one constant plane (PIXEL_MAX inside the frame: the normalisation's offset,
    DeployedStudent._weights_for_pixels). Every tap multiplies the same PIXEL_MAX there, so the rounding of that
    plane's int8 weights adds up over the taps instead of averaging out: on the demo's pruned student it was most of
    the int8 error (per-clip max logit error, median over the test clips: 0.63 with the plain quantizer, 0.34 with
    this correction, 0.17 for the same model on normalised float input). At every output position whose taps all fall inside the frame the
    error is a constant per output channel, PIXEL_MAX x the sum over the taps of (dequantized - float weight), and it
    comes off the stem's int32 bias here; the border positions keep the share of their out-of-frame taps."""
    graph, src = quantized.graph, source.graph
    gathers = [n for n in src.node if n.op_type == "Gather"]
    src_inits = {t.name: numpy_helper.to_array(t) for t in src.initializer}
    if not takes_pixels(source) or len(gathers) != 1 or gathers[0].input[1] not in src_inits:
        raise ValueError("correct_constant_plane_rounding: needs a pixel model's constant plane (uint8 input, one "
                         f"Gather of constant plane indices); this one has {len(gathers)} Gathers")
    planes = src_inits[gathers[0].input[1]]                 # the constant plane is the highest index (padded last)
    stem = next(n for n in graph.node if n.op_type == "Conv")
    producer = {out: node for node in graph.node for out in node.output}
    if stem.input[1] not in producer or producer[stem.input[1]].op_type != "DequantizeLinear":
        return quantized                                    # a stem kept in float: nothing was rounded
    src_stem = next(n for n in src.node if n.op_type == "Conv")
    float_weight = src_inits[src_stem.input[1]]                                 # [O, C'', k, k]
    float_bias = src_inits[src_stem.input[2]] if len(src_stem.input) > 2 and src_stem.input[2] else 0.0
    constant = int(np.flatnonzero(planes[: float_weight.shape[1]] == planes.max())[0])
    inits = {t.name: t for t in graph.initializer}
    w_q, w_scale = (numpy_helper.to_array(inits[name]) for name in producer[stem.input[1]].input[:2])
    w_scale = np.broadcast_to(w_scale.reshape(-1), w_q.shape[:1])   # [O]: per channel, or one per-tensor scale
    dequantized = w_q[:, constant].astype(np.float64) * w_scale[:, None, None]
    error = PIXEL_MAX * (dequantized - float_weight[:, constant]).sum(axis=(1, 2))   # [O], per output channel
    if len(stem.input) > 2 and stem.input[2]:
        bias_node = producer[stem.input[2]]
        b_scale = numpy_helper.to_array(inits[bias_node.input[1]])
        graph.initializer.remove(inits[bias_node.input[0]])
    else:   # an all-zero bias is dropped on export (untrained BN): add one, as the quantizer writes biases
        x_scale = numpy_helper.to_array(inits[producer[stem.input[0]].input[1]])
        b_scale, name = (x_scale * w_scale).astype(np.float32), stem.name
        bias_node = onnx.helper.make_node("DequantizeLinear", [f"{name}_bias_quantized", f"{name}_bias_scale",
                                                               f"{name}_bias_zero_point"], [f"{name}_bias"], axis=0)
        graph.initializer.extend([numpy_helper.from_array(b_scale, bias_node.input[1]),
                                  numpy_helper.from_array(np.zeros(len(w_scale), np.int32), bias_node.input[2])])
        graph.node.insert(0, bias_node)
        stem.input.append(bias_node.output[0])
    corrected = np.round((float_bias - error) / b_scale).astype(np.int32)   # one rounding, as the quantizer's
    graph.initializer.append(numpy_helper.from_array(corrected, bias_node.input[0]))
    return quantized


def store_block_diagonal_weights_compactly(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every int8 conv weight [G*O, G*C, k, k] that is G copies of one [O, C, k, k] block on its diagonal and zeros
    elsewhere (a packed body: DeployedStudent(packed_body=...)) stored as that block, with G Pads (block j: j*C zero
    input channels before it, (G-1-j)*C after) and a Concat over the output channels rebuilding the weight.
    onnxruntime folds those constants when it loads a session, before it fuses the QLinearConv, so the model runs as
    before while its file keeps the unpacked model's size (the demo's pruned student with two packed convs: 152 ->
    85 KB, against 190 KB in fp32). Exact: a weight is rewritten only where it is exactly that."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    rebuilt: dict[str, list[onnx.NodeProto]] = {}
    done: set[str] = set()   # a weight two nodes dequantize is rebuilt once; its Concat feeds both
    for node in graph.node:
        weight = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if weight is None or weight.name in done or weight.data_type != onnx.TensorProto.INT8 or len(weight.dims) != 4:
            continue
        values = numpy_helper.to_array(weight)
        g = _diagonal_blocks(values)
        if g == 1:
            continue
        out, cin = values.shape[0] // g, values.shape[1] // g
        name = weight.name
        graph.initializer.remove(weight)
        graph.initializer.append(numpy_helper.from_array(values[:out, :cin], f"{name}_block"))
        nodes = []
        for j in range(g):
            pads = np.array([0, j * cin, 0, 0, 0, (g - 1 - j) * cin, 0, 0], np.int64)  # [begins..., ends...]
            graph.initializer.append(numpy_helper.from_array(pads, f"{name}_pads_{j}"))
            nodes.append(onnx.helper.make_node("Pad", [f"{name}_block", f"{name}_pads_{j}"], [f"{name}_part_{j}"],
                                               name=f"{name}_pad_{j}"))
        nodes.append(onnx.helper.make_node("Concat", [n.output[0] for n in nodes], [name], axis=0,
                                           name=f"{name}_concat"))
        rebuilt[node.name] = nodes
        done.add(name)
    ordered = [n for node in graph.node for n in [*rebuilt.get(node.name, []), node]]
    del graph.node[:]
    graph.node.extend(ordered)
    return model


def _diagonal_blocks(weight: np.ndarray) -> int:
    """The most G for which `weight` [G*O, G*C, ...] is G equal blocks on its diagonal and zeros elsewhere; 1 if none."""
    for g in range(min(weight.shape[:2]), 1, -1):
        if weight.shape[0] % g or weight.shape[1] % g:
            continue
        out, cin = weight.shape[0] // g, weight.shape[1] // g
        expected = np.zeros_like(weight)
        for j in range(g):
            expected[j * out:(j + 1) * out, j * cin:(j + 1) * cin] = weight[:out, :cin]
        if weight[:out, :cin].any() and np.array_equal(weight, expected):
            return g
    return 1


def _uint8_tensor(graph: onnx.GraphProto, name: str) -> bool:
    """Whether shape inference or the graph's input typed `name` as uint8."""
    for value in [*graph.input, *graph.value_info]:
        if value.name == name:
            return value.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    return False


def convs_without_fast_int8_kernel(model: onnx.ModelProto) -> list[str]:
    """Names of ungrouped Conv nodes whose input channels are not a multiple of FAST_INT8_CHANNEL_MULTIPLE."""
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    names = []
    for node in model.graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        dims = weights.get(node.input[1]) if node.op_type == "Conv" else None
        if dims and group == 1 and dims[1] % FAST_INT8_CHANNEL_MULTIPLE:  # weight [out, in, k...]
            names.append(node.name)
    return names


def kept_in_fp32(model: onnx.ModelProto) -> list[str]:
    """Nodes quantization leaves in fp32: convs_without_fast_int8_kernel and everything that only feeds them.

    An unpadded stem (6 or 3 input channels; quantize_model_int8 pads a student's) is such a conv, and all before it
    is data movement. Quantized, that preamble became a chain of Quantize/Dequantize pairs that onnxruntime fused into
    a slow int8 stem (im2col, 6 channels): int8 was 0.72x of fp32 on the demo student. Kept in fp32, quantization
    starts at the stem's ReLU output."""
    kept = set(convs_without_fast_int8_kernel(model))
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in model.graph.output}
    for node in reversed(model.graph.node):  # ONNX graphs are topologically sorted: consumers come after producers
        users = [u for out in node.output for u in consumers.get(out, [])]
        if users and not graph_outputs & set(node.output) and all(u.name in kept for u in users):
            kept.add(node.name)
    return [n.name for n in model.graph.node if n.name in kept]


def op_counts(path: str | Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def measure_latency(path: str | Path, input_shape: Sequence[int], batch: int = 1, threads: int = 1,
                    warmup: int = 3, iters: int = 20, seed: int = 0, min_seconds: float = 0.0) -> dict[str, float]:
    """One model on a fresh onnxruntime session, by the shared protocol (vidopt/timing.py time_calls)."""
    session = ort_session(path, threads)
    feed = {INPUT_NAME: random_input(session, (batch, *input_shape), seed)}
    return time_calls(lambda: session.run([OUTPUT_NAME], feed), batch, warmup, iters, min_seconds)


def compare_latency(paths: dict[str, str | Path], input_shape: Sequence[int], batch: int, threads: int,
                    rounds: int = 5, warmup: int = 3, iters: int = 10,
                    min_seconds: float = 0.0) -> dict[str, dict[str, float]]:
    """measure_latency for several models, interleaved (vidopt/timing.py interleaved: rank by best_p50_ms)
    -> {name: {p50_ms, p95_ms, throughput_clips_s, best_p50_ms}}."""
    return interleaved({name: functools.partial(measure_latency, path, input_shape, batch, threads, warmup, iters,
                                                min_seconds=min_seconds) for name, path in paths.items()}, rounds)


def file_mb(path: str | Path) -> float:
    return os.path.getsize(path) / 1e6
