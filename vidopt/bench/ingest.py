"""Ingestion's per-file inspection, one PyAV pass against two: what probing and the decord check cost per file.

    vidopt bench ingest DIR [--checks 24] [--limit N] [--json out.json]

`two passes`: PyAV decodes every frame to count them, decord reads the check frames (filled up to --checks with
random ones, FFmpeg's own thread count), and PyAV decodes again up to the last of them for reference. `one pass` is `vidopt.video.inspect_video`: the check frames are planned from the
packets, kept as the probe counts the frames, and decord reads them on one thread. Files are timed interleaved, each
method in turn, and the two must pick the same decoder.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from vidopt.bench import cpu_model, print_report
from vidopt.video import _decord_vs_pyav_diffs, _frame_mismatch, decord_reader, inspect_video, probe_video


def two_pass_inspect(path: Path, max_checks: int, seed: int = 0) -> str:
    """The decoder the two-pass inspection picks (its check frames topped up with random ones)."""
    import decord

    probe = probe_video(path)
    n = probe.num_frames
    rng = np.random.default_rng(seed)
    near_keys = sorted({j for k in probe.keyframes for j in (k - 1, k, k + 1) if 0 <= j < n} | {n - 1})
    chosen = set(rng.choice(near_keys, size=min(max(1, 2 * max_checks // 3), len(near_keys)), replace=False).tolist())
    others = np.setdiff1d(np.arange(n), list(chosen))
    chosen |= set(rng.choice(others, size=min(max_checks - len(chosen), len(others)), replace=False).tolist())
    sample = sorted(chosen)
    reader = decord_reader(path, threads=0)
    if len(reader) != n:
        return "pyav"
    order = np.random.default_rng(seed).permutation(sample).tolist()
    try:
        batch = reader.get_batch(order).asnumpy()
    except decord.DECORDError:
        return "pyav"
    diffs = _decord_vs_pyav_diffs(path, dict(zip(order, batch)))
    return "pyav" if any(_frame_mismatch(i, diffs) for i in sample) else "decord"


def one_pass_inspect(path: Path, max_checks: int, seed: int = 0) -> str:
    return inspect_video(path, max_checks, seed)[1]


def run(files: list[Path], max_checks: int) -> dict:
    times: dict[str, list[float]] = {"two passes": [], "one pass": []}
    agree = 0
    for path in files:   # interleaved: a machine that slows down slows both
        picked = []
        for name, inspect in (("two passes", two_pass_inspect), ("one pass", one_pass_inspect)):
            started = time.perf_counter()
            picked.append(inspect(path, max_checks))
            times[name].append(time.perf_counter() - started)
        agree += picked[0] == picked[1]
    totals = {name: sum(t) for name, t in times.items()}
    return {"files": len(files), "max_checks": max_checks, "same_decoder": agree,
            "seconds": totals, "ms_per_file": {k: 1000 * v / max(len(files), 1) for k, v in totals.items()},
            "speedup": totals["two passes"] / max(totals["one pass"], 1e-9),
            "machine": cpu_model()}


def format_table(report: dict) -> str:
    ms = report["ms_per_file"]
    return "\n".join([
        f"{report['files']} files, {report['max_checks']} decoder checks, {report['machine']}",
        "| inspection | ms per file | seconds |", "|---|---:|---:|",
        *(f"| {name} | {ms[name]:.1f} | {report['seconds'][name]:.1f} |" for name in ms),
        f"one pass is {report['speedup']:.2f}x faster; same decoder picked for {report['same_decoder']} of "
        f"{report['files']} files"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="vidopt bench ingest", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="a folder of videos (searched recursively for .mp4 .avi .mkv .webm)")
    parser.add_argument("--checks", type=int, default=24, help="decoder checks per file (data.decoder_checks)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many files")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    files = sorted(p for p in args.root.rglob("*") if p.suffix in {".mp4", ".avi", ".mkv", ".webm"})[:args.limit]
    if not files:
        raise SystemExit(f"bench ingest: no videos under {args.root}")
    report = run(files, args.checks)
    return print_report(report, format_table(report), args.json)


if __name__ == "__main__":
    main()
