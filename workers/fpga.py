"""FPGA target: the student as two hls4ml IPs (frame encoder, temporal head) in calibrated fixed point.

    python -m workers.fpga JOB.json      # run one export job (see vidopt.artifacts.LocalExportJob) and print its result

Verified in hls4ml's bit-accurate C++ emulation (g++): argmax agreement with the fp32 PyTorch reference and top-1 on the
test clips. Synthesis needs AMD Vitis, absent here, so the HLS projects ship as an archive with the commands to run.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from vidopt.artifacts import LocalExportJob, TargetResult
from vidopt.checkpoint import load_model_dir
from vidopt.data import KINETICS_MEAN, KINETICS_STD
from vidopt.models import Student, StudentArch, has_pool
from workers.common import (VERIFIED_LOGITS, archive, batches, correct, load_eval_clips, model_classes, parity,
                            reference_logits, top1)

IO_TYPE = "io_stream"    # layer-by-layer FIFOs: the only way a 112x112 frame fits an FPGA (io_parallel unrolls it all)
CLOCK_NS = 5             # 200 MHz target clock for synthesis
ROUNDING = "RND,SAT"     # round to nearest (ap's default truncation biases every layer down) and saturate, never wrap
BUILD_OUTPUTS = (".so", ".o")  # host-specific emulation binaries: rebuilt from source, not shipped


def fold_student(model: Student, arch: StudentArch) -> tuple[nn.Sequential, nn.Sequential]:
    """The student as two flat Sequentials with BatchNorm folded into each conv, so the calibrated weight ranges are
    those of the weights on chip (hls4ml folds BN itself only into a conv whose output type is left 'auto').
    Child names become hls4ml layer names."""
    def fold(convs: nn.Sequential, prefix: str) -> OrderedDict:
        layers, pending = OrderedDict(), None
        for module in convs.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d)):
                pending = module
            elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                k = len(layers) // 2
                layers[f"{prefix}conv{k}"] = fuse_conv_bn_eval(pending, module)
                layers[f"{prefix}relu{k}"] = nn.ReLU()
        return layers

    encoder = fold(model.encoder.convs, "")
    if has_pool(model):   # a final map already grid x grid is flattened as it is
        encoder["pool"] = _stream_safe_pool(model.encoder.pool, arch.conv_widths[-1])
    encoder["flatten"] = nn.Flatten()
    head = fold(model.head.convs, "t")
    head.update(pool=model.head.pool, flatten=nn.Flatten(), fc=model.head.fc)
    return nn.Sequential(encoder).eval(), nn.Sequential(head).eval()


def _stream_safe_pool(pool: nn.AvgPool2d, channels: int) -> nn.Module:
    """hls4ml's io_stream pooling asserts kernel == stride (an abort inside the emulation library, not an exception),
    but the student's pool windows overlap where the final map does not divide by the grid (7x7 -> 2x2: kernel 4,
    stride 3). An equal Conv2d (weight 1/(kh*kw) on its own channel, 0 elsewhere) streams fine; synthesis drops the
    constant-zero multiplies."""
    kernel, stride = _pair(pool.kernel_size), _pair(pool.stride)
    if kernel == stride:
        return pool
    conv = nn.Conv2d(channels, channels, kernel, stride=stride, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        for c in range(channels):
            conv.weight[c, c] = 1.0 / (kernel[0] * kernel[1])
    return conv


@torch.no_grad()
def activation_ranges(net: nn.Sequential, x: torch.Tensor) -> dict[str, tuple[float, float]]:
    """(min, max) of the input and of each child's output over the calibration inputs, by forward hooks."""
    ranges = {"input": (float(x.min()), float(x.max()))}

    def record(name):
        def hook(_module, _inputs, out):
            lo, hi = ranges.get(name, (math.inf, -math.inf))
            ranges[name] = (min(lo, float(out.min())), max(hi, float(out.max())))
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in net.named_children()]
    try:
        for chunk in batches(x, 64):
            net(chunk)
    finally:
        for h in handles:
            h.remove()
    return ranges


def fixed_type(lo: float, hi: float, width: int, margin: int) -> str:
    """Smallest ap_fixed (ap_ufixed when lo >= 0) whose integer bits hold max(|lo|, |hi|), plus `margin` bits.
    Integer bits may be negative for small weights: every bit then goes to the fraction."""
    signed = lo < 0
    peak = max(abs(lo), abs(hi))
    magnitude_bits = math.floor(math.log2(peak)) + 1 if peak > 0 else 0  # 2**bits > peak
    integer = min(magnitude_bits + margin + int(signed), width)
    return f"{'fixed' if signed else 'ufixed'}<{width},{integer},{ROUNDING}>"


def layer_precisions(net: nn.Sequential, ranges: dict, width: int, margin: int) -> dict[str, dict[str, str]]:
    """hls4ml 'Precision' entries per layer name. Accumulators stay 'auto': hls4ml then sizes them for the exact sum
    (input bits + weight bits + log2 of the terms), so only the cast to each layer's result type rounds."""
    children = list(net.named_children())
    precisions = {"input": {"result": fixed_type(*ranges["input"], width, margin)}}
    for i, (name, module) in enumerate(children):
        lo, hi = ranges[name]
        if isinstance(module, nn.Flatten):
            continue  # a reshape: 'auto' keeps its input's type
        if i + 1 < len(children) and isinstance(children[i + 1][1], nn.ReLU):
            lo = -hi  # pre-ReLU: only the positive range matters; saturated negatives still become 0
        entry = {"result": fixed_type(lo, hi, width, margin)}
        for param in ("weight", "bias"):
            tensor = getattr(module, param, None)
            if isinstance(tensor, torch.Tensor):
                entry[param] = fixed_type(-float(tensor.detach().abs().max()), 0.0, width, 0)  # exact range: no margin
        precisions[name] = entry
    return precisions


def build_ip(hls4ml, net: nn.Sequential, input_shape: tuple[int, ...], precisions: dict, project: Path,
             testbench: tuple[np.ndarray, np.ndarray], width: int) -> tuple[object, float]:
    """Convert one Sequential to an hls4ml Vitis project and compile its C++ emulation; -> (model, compile seconds).
    input_shape is channels-first as PyTorch sees it; with 'internal' conversion the IP takes it channels-last."""
    started = time.monotonic()
    cfg = hls4ml.utils.config_from_pytorch_model(  # the default only reaches what hls4ml adds (e.g. a zero bias)
        net, input_shape, granularity="name", backend="Vitis", channels_last_conversion="internal",
        default_precision=f"fixed<{width},{width // 2},{ROUNDING}>")
    layers = cfg["LayerName"]
    input_name = next(n for n in layers if n not in dict(net.named_children()))  # hls4ml names the input 'input_1'
    for name, entry in precisions.items():
        name = input_name if name == "input" else name
        if name not in layers:
            raise KeyError(f"fpga: hls4ml has no layer {name!r} (its names: {sorted(layers)}); did its naming change?")
        layers[name]["Precision"].update(entry)
    tb_in, tb_out = (project.parent.parent / f"{project.name}_tb_{k}.npy" for k in ("in", "out"))
    np.save(tb_in, testbench[0])    # csim/cosim testbench (tb_data/): a few inputs and the fp32 PyTorch outputs
    np.save(tb_out, testbench[1])
    model = hls4ml.converters.convert_from_pytorch_model(
        net, output_dir=str(project), project_name=project.name, backend="Vitis", io_type=IO_TYPE,
        clock_period=CLOCK_NS, hls_config=cfg, input_data_tb=str(tb_in), output_data_tb=str(tb_out))
    model.compile()
    # so that the README's `vitis-run --tcl build_prj.tcl --mode hls` runs C synthesis and IP export, nothing else
    (project / "build_opt.tcl").write_text("array set opt {\n    reset 1\n    csim 0\n    synth 1\n    cosim 0\n"
                                           "    validation 0\n    export 1\n    vsynth 0\n    fifo_opt 0\n}\n")
    portable_config(project, tb_in, tb_out)
    return model, time.monotonic() - started


def portable_config(project: Path, tb_in: Path, tb_out: Path) -> None:
    """Make hls4ml_config.yml readable by hls4ml's own link_existing_project (yaml.safe_load), as the README promises:
    for a PyTorch model hls4ml embeds the torch module (!!python/object) and the input shape (!!python/tuple), and it
    records absolute temp paths. Drop the module, untag the tuple, make paths relative to the archive root."""
    config_file = project / "hls4ml_config.yml"
    kept, in_module = [], False
    for line in config_file.read_text().splitlines():
        if not line.startswith((" ", "-")):                               # a top-level key
            in_module = line.startswith("PytorchModel:")
        if not in_module:
            kept.append(line)
    text = "\n".join(kept).replace(" !!python/tuple", "").replace(f"OutputDir: {project}", f"OutputDir: {project.name}")
    for key, path, dat in (("InputData", tb_in, "input_features"), ("OutputPredictions", tb_out, "output_predictions")):
        text = text.replace(f"{key}: {path}", f"{key}: {project.name}/tb_data/tb_{dat}.dat")
    yaml.safe_load(text)  # fails here, not on the user's machine, if hls4ml writes other Python objects
    config_file.write_text(text + "\n")


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def shipped_types(hls_model) -> dict[str, str]:
    """Each layer's output type as hls4ml resolved it (including layers it inserted: padding, transposes)."""
    return {layer.name: str(layer.get_output_variable().type.precision) for layer in hls_model.get_layers()}


def readme(arch: StudentArch, hls4ml_version: str, types: dict[str, dict[str, str]], margin: int) -> str:
    t, d, h, w = arch.frames, arch.feature_dim(), arch.height, arch.width
    c = arch.input_channels()
    channels = ("RGB scaled to [0, 1], then standardised with the Kinetics mean/std (`vidopt.data.normalise_clips`)"
                + (", then the same 3 channels of the next frame minus this one (zeros for the clip's last frame)"
                   if arch.frame_differences else ""))
    layer_lines = "\n".join(f"| {ip} | {name} | `{p}` |" for ip, table in types.items() for name, p in table.items())
    return f"""# vidopt student as two hls4ml IPs
hls4ml {hls4ml_version}, Vitis backend, {IO_TYPE}, {CLOCK_NS} ns clock.

| IP | does | input | output |
|---|---|---|---|
| `encoder/` | per-frame 2D CNN (conv+BN folded, ReLU, average pool to a grid, flatten) | one frame `[{h}, {w}, {c}]` (H, W, C: NHWC, channels last): {channels} | `[{d}]` features |
| `head/` | temporal Conv1d+ReLU, average over all {t} steps, Linear | one clip's features `[{t}, {d}]` (T, D: channels last) | `[{arch.num_classes}]` logits |

Chaining: run `encoder` on each of the clip's {t} frames in order, stack the {t} feature vectors as rows of a
`[{t}, {d}]` array and feed it to `head`; argmax of the logits is the class.
Normalisation (and the frame differences) are left to the host or a DMA-side stage: folding normalisation into the
first conv would change what its zero padding means.

Precision: `ap_fixed<W,I>` / `ap_ufixed` (unsigned after ReLU) with round-to-nearest and saturation; I from the largest
activation seen on the calibration clips (+{margin} bit margin), weights and biases from their own max-abs.
Accumulators are sized by hls4ml for the exact sum.

| IP | layer | output type |
|---|---|---|
{layer_lines}

## Synthesis with the vendor tools (AMD Vitis HLS, as hls4ml's Vitis backend runs it)
Each IP's `build_opt.tcl` is set to C synthesis + IP export (reset=1 synth=1 export=1, no csim/cosim):

    cd encoder && vitis-run --tcl build_prj.tcl --mode hls && cd ..      # older Vitis HLS: vitis_hls -f build_prj.tcl
    cd head && vitis-run --tcl build_prj.tcl --mode hls && cd ..

or from Python, in this folder (returns the parsed report):

    python -c "import hls4ml; print(hls4ml.converters.link_existing_project('encoder').build(reset=True, csim=False, \\
               synth=True, export=True))"

Latency (cycles) and resources: `<ip>/<ip>_prj/solution1/syn/report/<ip>_csynth.rpt`; the exported IP (AXI-stream
ports) under `<ip>/<ip>_prj/solution1/impl/ip/`, ready for Vivado's IP integrator. Stream words: `encoder` reads one
pixel (3 values) per word, row-major, and writes one word of {d} features per frame; `head` reads one such word per
time step, {t} per clip, so `encoder`'s output feeds `head`'s input directly (same type), through a FIFO of {t} words.
C simulation against the PyTorch outputs in `tb_data/` (a few frames / clips): set `csim 1` in `build_opt.tcl`.
Bit-accurate emulation without vendor tools: `hls4ml.converters.link_existing_project('encoder').compile()` then
`.predict(frames_nhwc)`. The part defaults to hls4ml's Vitis default; change it in `project.tcl`.
"""


def missing_toolchain() -> str:
    try:
        import hls4ml  # noqa: F401  (an install that fails to import counts as absent)
    except Exception as err:
        return f"hls4ml is not importable ({type(err).__name__}: {err}); pip install hls4ml"
    if shutil.which("g++") is None:
        return "g++ not found: hls4ml's C++ emulation needs it"
    return ""


def run_target(job: LocalExportJob) -> TargetResult:
    started = time.monotonic()
    if reason := missing_toolchain():
        return TargetResult(target="fpga", status="skipped", reason=reason)
    import hls4ml  # lazy: the module imports without it

    model, arch = load_model_dir(job.model_dir)
    if arch.kind != "student":
        return TargetResult(target="fpga", status="skipped",
                            reason=f"fpga: only a student exports to hls4ml, not a {arch.kind} (Conv3d is unsupported)")
    width, margin = job.options.fixed_width, job.options.margin_bits
    x, truth = load_eval_clips(job)                                      # [N, C, T, H, W] normalised
    # The emulation is slow (one core: ~2.6 s per 16x64x64 clip, ~10 s at 16x112x112): a cap keeps big test splits
    # inside the pool's job timeout. None: every clip.
    if limit := job.options.max_eval_clips:
        x, truth = x[:limit], truth.head(limit)
    t, d, c = arch.frames, arch.feature_dim(), arch.input_channels()
    encoder, head = fold_student(model, arch)
    with torch.no_grad():  # the host's part: frame differences (parameter-free), before the encoder IP
        encoder_x = model.encoder_input(x)                                # [N, C', T, H, W]
    frames = encoder_x.permute(0, 2, 3, 4, 1).reshape(-1, arch.height, arch.width, c)  # [N*T, H, W, C'], NHWC
    # Calibration on the first eval (test) clips, as the contract offers no other split here; ranges only, no labels.
    calib = encoder_x[: job.options.calibration_clips]
    calib_frames = calib.transpose(1, 2).reshape(-1, c, arch.height, arch.width)  # [n, C', T, H, W] -> [n*T, C', H, W]
    enc_ranges = activation_ranges(encoder, calib_frames)
    with torch.no_grad():
        calib_features = encoder(calib_frames).reshape(len(calib), t, d).transpose(1, 2)  # -> [n, D, T]
    head_ranges = activation_ranges(head, calib_features)

    with tempfile.TemporaryDirectory(prefix="vidopt_fpga_") as tmp:
        root = Path(tmp) / "fpga_hls_project"
        root.mkdir()
        with torch.no_grad():
            tb_frames = calib_frames[:4]
            tb_enc = (tb_frames.permute(0, 2, 3, 1).numpy(), encoder(tb_frames).numpy())
            tb_head = (calib_features[:2].transpose(1, 2).numpy(), head(calib_features[:2]).numpy())
        enc_types = layer_precisions(encoder, enc_ranges, width, margin)
        head_types = layer_precisions(head, head_ranges, width, margin)
        # one type on the wire: the encoder's output stream feeds the head as it is
        head_types["input"] = {"result": enc_types[list(enc_types)[-1]]["result"]}
        enc_ip, enc_s = build_ip(hls4ml, encoder, (c, arch.height, arch.width), enc_types, root / "encoder", tb_enc,
                                 width)
        head_ip, head_s = build_ip(hls4ml, head, (d, t), head_types, root / "head", tb_head, width)
        emulation_started = time.monotonic()
        logits = []
        for clips in batches(frames, 8 * t):                              # 8 clips' frames at a time
            n = len(clips) // t
            features = enc_ip.predict(np.ascontiguousarray(clips.numpy())).reshape(n, t, d)  # [n*T, D] -> [n, T, D]
            logits.append(np.asarray(head_ip.predict(np.ascontiguousarray(features))).reshape(n, -1))
        logits = np.concatenate(logits)
        emulation_s = time.monotonic() - emulation_started
        types = {"encoder": shipped_types(enc_ip), "head": shipped_types(head_ip)}
        (root / "README.md").write_text(readme(arch, hls4ml.__version__, types, margin))
        # what the project's MLflow model (vidopt/mlflow_hls_model.py) needs to run the two IPs on decoded clips
        (root / "runtime.json").write_text(json.dumps({
            "ips": ["encoder", "head"], "frames": t, "height": arch.height, "width": arch.width, "feature_dim": d,
            "frame_differences": arch.frame_differences, "runtime": f"hls4ml {hls4ml.__version__} C++ emulation",
            "input": {"normalise": {"mean": list(KINETICS_MEAN), "std": list(KINETICS_STD)}},
            "classes": model_classes(job)}, indent=2))
        for built in [p for p in root.rglob("*") if p.suffix in BUILD_OUTPUTS]:
            built.unlink()
        Path(job.out_dir).mkdir(parents=True, exist_ok=True)
        np.save(Path(job.out_dir) / VERIFIED_LOGITS, logits)   # what the registered model must reproduce
        artifact = archive(root, Path(job.out_dir) / "fpga_hls_project.tar.gz")

    reference = reference_logits(job, x)
    result_parity = parity(logits, reference)
    ref_top1, fpga_top1 = top1(reference, truth), top1(logits, truth)
    return TargetResult(
        target="fpga", status="ok", runtime=f"hls4ml {hls4ml.__version__} C++ emulation (Vitis backend, g++)",
        artifact_uri=str(artifact), artifact_bytes=artifact.stat().st_size,
        parity={**result_parity, "reference_top1": ref_top1, "top1_delta": fpga_top1 - ref_top1}, top1=fpga_top1,
        correct=correct(logits, truth),
        latency_ms=None, seconds=time.monotonic() - started,
        extra={"latency_note": "hls4ml estimates no latency without vendor tools; the synthesis report of "
                               "`build(synth=True)` gives it in cycles (see the archive's README)",
               "eval_clips": len(x), "io_type": IO_TYPE, "fixed_width": width, "margin_bits": margin,
               "calibration_clips": len(calib),
               "compile_s": {"encoder": round(enc_s, 1), "head": round(head_s, 1)},
               "emulation_s_per_clip": emulation_s / max(len(logits), 1), "layer_types": types,
               "meets_bar": result_parity["argmax_agreement"] >= 0.99 and fpga_top1 >= ref_top1 - 0.01},
    )


if __name__ == "__main__":
    import sys

    print(run_target(LocalExportJob.model_validate_json(Path(sys.argv[1]).read_text())).model_dump_json(indent=2))
