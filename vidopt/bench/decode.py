"""Decoder benchmark over `<label>/<video>.mp4`: clip-sampling throughput and sequential decode rate, decord vs PyAV,
overall and per kind of file (resolution and frame rate). One process, one decoding thread: the numbers are per core.

    vidopt bench decode DIR [--clips 200] [--frames 16] [--stride 2] [--size 112 112] [--json out.json]
    vidopt bench decode --mix DIR     # first writes camera-like files of four resolutions and frame rates to DIR
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from vidopt.bench import print_report
from vidopt.data import sample_clip_indices
from vidopt.video import DECODERS, DecodeError, decord_message, decord_reader, iter_frames, probe_video, read_frames

SEQUENTIAL_CHUNK = 32  # decord frames per get_batch when decoding a whole file: bounds memory on long videos


# (height, width, fps, frames): what surveillance and phone cameras hand in, from a 10 fps QVGA to 1080p.
MIX = ((240, 320, 10, 40), (360, 640, 15, 60), (720, 1280, 30, 90), (1080, 1920, 25, 60))
MIX_PER_KIND = 2


def find_videos(root: Path) -> tuple[list[tuple[Path, int]], list[str], dict[Path, str]]:
    """-> ([(path, decoded frame count)], [skip notes], {path: its kind, "WxH @ fps"}) for every
    `<label>/<video>.mp4` PyAV can decode."""
    videos, skipped, kinds = [], [], {}
    for path in sorted(root.glob("*/*.mp4")):
        try:
            probe = probe_video(path)
        except DecodeError as err:
            skipped.append(f"{path.relative_to(root)}: {err}")
            continue
        videos.append((path, probe.num_frames))
        kinds[path] = f"{probe.width}x{probe.height} @ {probe.fps:g} fps"
    return videos, skipped, kinds


def write_mix(root: Path, seed: int = 0) -> None:
    """MIX_PER_KIND H.264 files of every MIX kind under root/mix/: a textured scene panning a few pixels a frame,
    so the codec codes real motion (neither static skip blocks nor incompressible noise)."""
    from vidopt.sample_data import write_mp4

    rng = np.random.default_rng(seed)
    (root / "mix").mkdir(parents=True, exist_ok=True)
    for height, width, fps, frames in MIX:
        for index in range(MIX_PER_KIND):
            path = root / "mix" / f"{width}x{height}-{fps}fps-{index}.mp4"
            if path.exists():
                continue
            texture = rng.integers(0, 256, (height // 8 + frames, width // 8 + frames, 3), dtype=np.uint8)
            texture = texture.repeat(8, 0).repeat(8, 1)                       # 8x8 blocks: detail, not noise
            ramp = np.linspace(0, 60, width, dtype=np.float32)[None, :, None]
            video = np.stack([np.clip(0.7 * texture[4 * t:4 * t + height, 2 * t:2 * t + width] + ramp, 0, 255)
                              for t in range(frames)]).astype(np.uint8)       # [T, H, W, 3], panning
            write_mp4(video, path, fps)


def plan_clips(videos: list[tuple[Path, int]], clips: int, frames: int, stride: int,
               seed: int) -> list[tuple[Path, list[int]]]:
    """The same random clips for every decoder, drawn the way the training loader draws them."""
    rng = np.random.default_rng(seed)
    usable = [(path, n) for path, n in videos if n >= frames]
    if not usable:
        raise SystemExit(f"bench.decode: no video has the {frames} frames a clip needs")
    picks = rng.integers(0, len(usable), clips)
    return [(usable[k][0], sample_clip_indices(usable[k][1], frames, stride, train=True, rng=rng)) for k in picks]


def time_clip_sampling(plan: list[tuple[Path, list[int]]], decoder: str, size: tuple[int, int]) -> list[float]:
    """Seconds per planned clip through read_frames, exactly as the data loader calls it."""
    seconds = []
    for path, indices in plan:
        start = time.perf_counter()
        read_frames(path, indices, decoder=decoder, size=size)
        seconds.append(time.perf_counter() - start)
    return seconds


def decode_all_pyav(path: Path) -> int:
    return sum(1 for _ in iter_frames(path))  # RGB like decord, which always converts


def decode_all_decord(path: Path) -> int:
    import decord

    reader = decord_reader(path)
    try:
        count = len(reader)
        for start in range(0, count, SEQUENTIAL_CHUNK):
            reader.get_batch(list(range(start, min(start + SEQUENTIAL_CHUNK, count)))).asnumpy()
        return count
    except decord.DECORDError as err:  # e.g. widths decord cannot copy out (48 px): reported as this decoder's failure
        raise DecodeError(f"{path}: decord failed: {decord_message(err)}") from None
    finally:
        del reader


def time_sequential(videos: list[tuple[Path, int]], decoder: str) -> float:
    """frames/s decoding every frame of every file in order, to RGB at native size."""
    decode_all = {"pyav": decode_all_pyav, "decord": decode_all_decord}[decoder]
    start = time.perf_counter()
    frames = sum(decode_all(path) for path, _ in videos)
    return frames / (time.perf_counter() - start)


def warm_up(decoder: str, path: Path) -> None:
    """Load the decoder's libraries and fill OS caches before timing, so the first decoder measured is not penalised."""
    try:
        read_frames(path, [0], decoder=decoder)
    except DecodeError:
        pass  # measure() reports it


def measure(decoder: str, videos: list[tuple[Path, int]], plan: list[tuple[Path, list[int]]],
            size: tuple[int, int], kinds: dict[Path, str]) -> dict:
    """clips/s overall and per kind of file ("clips_per_s:<kind>"), sequential frames/s."""
    try:
        seconds = time_clip_sampling(plan, decoder, size)
        numbers = {"clips_per_s": len(seconds) / sum(seconds)}
        for kind in sorted(set(kinds.values())):
            mine = [s for (path, _), s in zip(plan, seconds) if kinds[path] == kind]
            if mine:
                numbers[f"clips_per_s:{kind}"] = len(mine) / sum(mine)
        return numbers | {"sequential_frames_per_s": time_sequential(videos, decoder)}
    except DecodeError as err:  # e.g. decord cannot open AV1: report it, keep the other decoder's numbers
        return {"error": str(err)}


def best_of(runs: list[dict]) -> dict:
    """Per number, the best round: on a shared machine the slow rounds measure the neighbours, not the decoder."""
    errors = [run for run in runs if "error" in run]
    return errors[0] if errors else {key: max(run[key] for run in runs) for key in runs[0]}


def run_benchmark(root: Path, clips: int, frames: int, stride: int, size: tuple[int, int], seed: int,
                  repeats: int) -> dict:
    videos, skipped, kinds = find_videos(root)
    if not videos:
        raise SystemExit(f"bench.decode: no decodable <label>/<video>.mp4 under {root}")
    plan = plan_clips(videos, clips, frames, stride, seed)
    for decoder in DECODERS:
        warm_up(decoder, videos[0][0])
    runs = {decoder: [] for decoder in DECODERS}
    for _ in range(repeats):  # alternate decoders so slow spells of a noisy machine hit both
        for decoder in DECODERS:
            runs[decoder].append(measure(decoder, videos, plan, size, kinds))
    return {
        "root": str(root), "videos": len(videos), "total_frames": sum(n for _, n in videos), "skipped": skipped,
        "kinds": {kind: sum(1 for k in kinds.values() if k == kind) for kind in sorted(set(kinds.values()))},
        "clips": clips, "frames": frames, "stride": stride, "size": list(size), "repeats": repeats,
        "results": {decoder: best_of(decoder_runs) for decoder, decoder_runs in runs.items()},
    }


def format_table(report: dict) -> str:
    height, width = report["size"]
    skipped = f", {len(report['skipped'])} skipped" if report["skipped"] else ""
    lines = [
        f"{report['videos']} videos ({report['total_frames']} frames) under {report['root']}{skipped}",
        f"clip sampling: {report['clips']} random clips of {report['frames']} frames, stride {report['stride']}, "
        f"resized to {height}x{width}; sequential: every frame of every video, native size, RGB; "
        f"best of {report['repeats']} rounds",
        f"{'decoder':<8} {'clips/s':>10} {'frames/s':>12}",
    ]
    for decoder, numbers in report["results"].items():
        if "error" in numbers:
            lines.append(f"{decoder:<8} failed: {numbers['error']}")
        else:
            lines.append(f"{decoder:<8} {numbers['clips_per_s']:>10.1f} {numbers['sequential_frames_per_s']:>12.0f}")
    if len(report["kinds"]) > 1:
        width = max(len(k) for k in report["kinds"])
        lines += ["", "clips/s per core by kind of file", f"{'file kind':<{width}} {'videos':>6} "
                  + " ".join(f"{d:>8}" for d in report["results"])]
        for kind, count in report["kinds"].items():
            cells = [f"{report['results'][d].get(f'clips_per_s:{kind}', float('nan')):>8.1f}"
                     for d in report["results"]]
            lines.append(f"{kind:<{width}} {count:>6} " + " ".join(cells))
    lines += [f"skipped {note}" for note in report["skipped"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m vidopt.bench.decode", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, nargs="?", help="folder of <label>/<video>.mp4")
    parser.add_argument("--mix", type=Path, metavar="DIR",
                        help="write camera-like files of several resolutions and frame rates here, then bench them")
    parser.add_argument("--clips", type=int, default=200, help="clips to sample per decoder")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip (T)")
    parser.add_argument("--stride", type=int, default=2, help="frame step inside a clip, as the training loader uses")
    parser.add_argument("--size", type=int, nargs=2, default=(112, 112), metavar=("H", "W"),
                        help="resize inside the decoder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="rounds per decoder; the best is reported")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    if args.mix is not None:
        write_mix(args.mix, args.seed)
    if (args.root or args.mix) is None:
        parser.error("give a folder of <label>/<video>.mp4, or --mix DIR")
    report = run_benchmark(args.root or args.mix, args.clips, args.frames, args.stride, tuple(args.size), args.seed,
                           args.repeats)
    return print_report(report, format_table(report), args.json)


if __name__ == "__main__":
    main()
