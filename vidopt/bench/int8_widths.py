"""How much int8 buys on onnxruntime CPU as a function of layer width: stacks of 3x3 convs, fp32 against int8.

    vidopt bench int8-widths [--widths 16 32 48 64 128] [--frames 8] [--size 16] [--depth 4] [--out DIR]

Why it exists: the pruned demo student's int8 model is only ~1.25x its fp32 (the issue's bar is 2x), while wider
students gain more. onnxruntime's x86 int8 convolution (MLAS's symmetric conv kernel, mlas/lib/convsym.cpp) computes
up to 64 output channels per pass on AVX-512 VNNI (KernelChannelCount 64) and pays its per-pixel costs (input
indirection, requantisation) once per pass, while the fp32 NCHWc convolution works in 16-channel blocks. A layer
16 channels wide leaves three quarters of each int8 pass idle. Each row here is one width: `depth` convolutions
W -> W (stride 1, ReLU) over `frames` maps of size x size, quantized the way the pipeline quantizes (quantize_int8:
QDQ, per-channel int8 weights, uint8 activations), timed whole (the input's quantize and the output's dequantize
included) at batch `frames` on 1 thread, interleaved, the median over rounds.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch
from torch import nn

from vidopt.bench import write_report
from vidopt.onnx_utils import compare_latency, export_onnx, quantize_int8

log = logging.getLogger("vidopt.bench.int8_widths")
DEFAULTS = {"widths": [16, 32, 48, 64, 128], "frames": 8, "size": 16, "depth": 4, "rounds": 5, "min_seconds": 0.25}


def conv_stack(width: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers)


def measure_width(width: int, frames: int, size: int, depth: int, rounds: int, min_seconds: float,
                  work: Path) -> dict:
    """One row: fp32 and int8 p50 of a stack of `depth` convs at `width`, on input [frames, width, size, size]."""
    shape = (width, size, size)  # one map [C, H, W]; the frames are the batch
    torch.manual_seed(width)
    fp32 = export_onnx(conv_stack(width, depth), shape, work / f"w{width}_fp32.onnx")
    calibration = [torch.randn(frames, *shape, generator=torch.Generator().manual_seed(1))]
    int8 = quantize_int8(fp32, work / f"w{width}_int8.onnx", calibration)
    latency = compare_latency({"fp32": fp32, "int8": int8}, shape, batch=frames, threads=1, rounds=rounds,
                              iters=10, min_seconds=min_seconds)
    macs = depth * frames * size * size * width * width * 9
    return {"width": width, "gmacs": macs / 1e9, "fp32_p50_ms": latency["fp32"]["p50_ms"],
            "int8_p50_ms": latency["int8"]["p50_ms"],
            "int8_speedup": latency["fp32"]["p50_ms"] / latency["int8"]["p50_ms"]}


def markdown(report: dict) -> str:
    setup = report["setup"]
    lines = [f"## int8 vs fp32 by layer width: {setup['depth']} convs 3x3, {setup['frames']} maps of "
             f"{setup['size']}x{setup['size']}, 1 thread, onnxruntime CPU", "",
             "| width | GMACs | fp32 p50 ms | int8 p50 ms | int8 speed-up |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['width']} | {r['gmacs']:.4f} | {r['fp32_p50_ms']:.3f} | {r['int8_p50_ms']:.3f} | "
              f"**{r['int8_speedup']:.2f}x** |" for r in report["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="vidopt bench int8-widths", description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=DEFAULTS["widths"],
                        help="channels in and out of every conv (multiples of 4: int8's fast kernel needs them)")
    parser.add_argument("--frames", type=int, default=DEFAULTS["frames"], help="maps per call (a clip's frames)")
    parser.add_argument("--size", type=int, default=DEFAULTS["size"], help="map height = width")
    parser.add_argument("--depth", type=int, default=DEFAULTS["depth"], help="convs in the stack")
    parser.add_argument("--rounds", type=int, default=DEFAULTS["rounds"], help="interleaved rounds; medians")
    parser.add_argument("--min-seconds", type=float, default=DEFAULTS["min_seconds"],
                        help="each measurement times calls for at least this long")
    parser.add_argument("--out", type=Path, default=Path(".vidopt/bench/int8_widths"),
                        help="writes int8_widths.json and int8_widths.md")
    args = parser.parse_args(argv)
    if any(w % 4 for w in args.widths):
        parser.error(f"--widths must be multiples of 4 (int8's fast conv kernel needs them), got {args.widths}")

    setup = {"frames": args.frames, "size": args.size, "depth": args.depth, "rounds": args.rounds, "threads": 1}
    rows = []
    with tempfile.TemporaryDirectory(prefix="vidopt-int8-widths-") as tmp:
        for width in args.widths:
            log.info("int8-widths: width %d (%d of %d)", width, len(rows) + 1, len(args.widths))
            rows.append(measure_width(width, args.frames, args.size, args.depth, args.rounds, args.min_seconds,
                                      Path(tmp)))
    report = {"setup": setup, "rows": rows}
    write_report(args.out, "int8_widths", report, markdown(report))
    return report


if __name__ == "__main__":
    main()
