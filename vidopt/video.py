"""Video decoding: probe a file by decoding it, read RGB frames by index with PyAV or decord, and decide per file
whether decord's fast random access can be trusted (decord 0.6.0 silently returns wrong frames for some codecs).
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

DECODERS = ("pyav", "decord")

# decord and PyAV convert 8-bit YUV to RGB bit-identically here (measured: mean abs diff 0.000 on H.264/VP9/HEVC/MPEG-4,
# BT.601/BT.709/full range, odd sizes). Another FFmpeg build may round differently, by at most one level per channel,
# so 1.0 bounds honest rounding and the 0.5 on top covers chroma-upsampling differences at edges. Larger gaps (10-bit
# sources: 1.7-4.0, max 26 levels) are not rounding, so such files stay on PyAV. Off-by-one frames are caught separately
# by "closer to PyAV's frame i than to i-1 and i+1", since neighbours in a still scene differ by as little as 0.05.
MAX_MEAN_ABS_DIFF = 1.5
# decord resizes with FFmpeg's scale filter and its default bilinear flags; matching it keeps the decoders
# interchangeable (measured: bilinear differs from decord by 0.04 mean abs, bicubic by 0.47).
RESIZE_INTERPOLATION = "BILINEAR"


class DecodeError(Exception):
    """A video that cannot be decoded, or a request it cannot satisfy; the message says what is wrong."""


@dataclass(frozen=True)
class VideoProbe:
    container: str  # PyAV's container.format.name, e.g. "mov,mp4,m4a,3gp,3g2,mj2"
    codec: str  # canonical codec name ("av1", not the decoder's "libdav1d")
    fps: float  # average frame rate
    num_frames: int  # frames actually decoded; headers are often wrong
    width: int
    height: int
    duration_s: float  # num_frames / fps
    keyframes: tuple[int, ...]  # indices (decoded order) of key frames
    captured: dict = field(default_factory=dict, repr=False, compare=False)  # index -> RGB [H, W, 3] kept in passing

    def to_dict(self) -> dict:
        fields = asdict(self)
        fields["keyframes"] = list(self.keyframes)
        fields.pop("captured")
        return fields


def planned_checks(path: str | Path, max_checks: int, seed: int = 0) -> list[int]:
    """check_indices from the container's packets alone (no decoding): their count and which are key frames. The
    decode pass then keeps these frames' RGB as it counts the frames, so the check needs no second PyAV pass."""
    with _opened_video(path) as (container, stream):
        keys, count = [], 0
        for packet in container.demux(stream):
            if packet.size:
                if packet.is_keyframe:
                    keys.append(count)
                count += 1
    if count == 0:
        return []
    outline = VideoProbe("", "", 1.0, count, 0, 0, 0.0, tuple(keys))
    return check_indices(outline, max_checks, seed)


def inspect_video(path: str | Path, max_checks: int = 24, seed: int = 0) -> tuple[VideoProbe, str, str]:
    """(probe, decoder, why) in one decoding pass of PyAV: the frames the decord check compares are kept as the probe
    counts the frames, planned from the packets (planned_checks)."""
    planned = planned_checks(path, max_checks, seed)
    probe = probe_video(path, capture={j for i in planned for j in (i - 1, i, i + 1)})
    sample = [i for i in planned if i < probe.num_frames] or check_indices(probe, max_checks, seed)
    decoder, why = choose_decoder(path, probe, max_checks, seed, sample=sample)
    return probe, decoder, why


@contextmanager
def _opened_video(path: str | Path) -> Iterator[tuple[av.container.InputContainer, av.video.stream.VideoStream]]:
    try:
        file_size = Path(path).stat().st_size
    except OSError as err:
        raise DecodeError(f"cannot open: {err.strerror or err}") from None
    if file_size == 0:
        raise DecodeError("zero-byte file")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as err:
        raise DecodeError(f"cannot open: {_ffmpeg_message(err)}") from None
    with container:
        if not container.streams.video:
            kinds = sorted({stream.type for stream in container.streams}) or ["none"]
            raise DecodeError(f"no video stream (streams: {', '.join(kinds)})")
        # No frame threading: it hides decode errors of damaged files (measured), and data-loader workers already
        # fill the cores; it only paid off at 720p (1.4x).
        yield container, container.streams.video[0]


def _ffmpeg_message(err: Exception) -> str:
    return getattr(err, "strerror", None) or str(err)


def _decoded_frames(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                    path: str | Path) -> Iterator[av.VideoFrame]:
    """Every frame in decoded order; DecodeError when decoding fails or the file holds fewer frames than it indexes."""
    decoded = packets = data_end = 0
    try:
        for packet in container.demux(stream):
            if packet.size:  # the final empty packet only flushes the decoder
                packets += 1
                data_end = (packet.pos or 0) + packet.size
            for frame in packet.decode():
                yield frame
                decoded += 1
    except av.FFmpegError as err:
        if data_end >= Path(path).stat().st_size:  # the failing packet is cut off by the end of the file
            raise DecodeError(f"truncated: the file ends inside frame data after {decoded} frames") from None
        raise DecodeError(f"decode error at frame {decoded}: {_ffmpeg_message(err)}") from None
    if 0 < packets < stream.frames:  # cut at a packet boundary, or packets lost (mp4 and avi index their frames)
        raise DecodeError(f"truncated or damaged: its index lists {stream.frames} frames, the file holds {packets}")


def probe_video(path: str | Path, capture: set[int] = frozenset()) -> VideoProbe:
    """Decode every frame (no RGB conversion) to learn what the file really holds; DecodeError if it is not a video.
    `capture`: frame indices whose RGB to keep on the probe (`captured`), converted as they pass."""
    captured, to_rgb = {}, _rgb_converter(None)
    with _opened_video(path) as (container, stream):
        keyframes, num_frames, width, height = [], 0, 0, 0
        for frame in _decoded_frames(container, stream, path):
            if frame.key_frame:
                keyframes.append(num_frames)
            if num_frames in capture:
                captured[num_frames] = to_rgb(frame)
            width, height = frame.width, frame.height
            num_frames += 1
        if num_frames == 0:
            raise DecodeError("no decodable video frames")
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise DecodeError("no frame rate in the container")
        return VideoProbe(
            container=container.format.name,
            codec=stream.codec_context.codec.canonical_name,
            fps=float(rate),
            num_frames=num_frames,
            width=width,
            height=height,
            duration_s=num_frames / float(rate),
            keyframes=tuple(keyframes),
            captured=captured,
        )


def read_frames(path: str | Path, indices: Sequence[int], decoder: str = "pyav",
                size: tuple[int, int] | None = None) -> np.ndarray:
    """-> uint8 [len(indices), H, W, 3] RGB in the requested order (repeats and any order allowed).

    size = (height, width) resizes inside the decoder. "pyav" decodes from the start (right for every codec);
    "decord" seeks (fast, but only for files choose_decoder verified).
    """
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("read_frames: no frame indices given")
    if min(indices) < 0:
        raise ValueError(f"read_frames: negative frame index {min(indices)}")
    readers = {"pyav": _read_with_pyav, "decord": _read_with_decord}
    if decoder not in readers:
        raise ValueError(f"read_frames: unknown decoder {decoder!r}; expected one of {DECODERS}")
    try:
        return readers[decoder](path, indices, size)
    except DecodeError as err:
        raise DecodeError(f"{path}: {err}") from None


def _rgb_converter(size: tuple[int, int] | None) -> Callable[[av.VideoFrame], np.ndarray]:
    """frame -> uint8 [H, W, 3] RGB, optionally resized to size = (height, width).

    One reformatter per read, single-threaded: frame.to_ndarray() builds a fresh swscale context with its own thread
    pool for every frame, measured 10-100x slower on small frames (96x96: ~300 vs ~70,000 frames/s).
    """
    reformatter = VideoReformatter()
    height, width = size if size is not None else (None, None)

    def to_rgb(frame: av.VideoFrame) -> np.ndarray:
        return reformatter.reformat(frame, width=width, height=height, format="rgb24",
                                    interpolation=RESIZE_INTERPOLATION, threads=1).to_ndarray()

    return to_rgb


def iter_frames(path: str | Path, size: tuple[int, int] | None = None) -> Iterator[np.ndarray]:
    """Every frame in decoded order as uint8 [H, W, 3] RGB (PyAV, sequential), without holding the whole video."""
    to_rgb = _rgb_converter(size)
    with _opened_video(path) as (container, stream):
        for frame in _decoded_frames(container, stream, path):
            yield to_rgb(frame)


def _read_with_pyav(path: str | Path, indices: list[int], size: tuple[int, int] | None) -> np.ndarray:
    wanted, last = set(indices), max(indices)
    frames: dict[int, np.ndarray] = {}
    count, to_rgb = 0, _rgb_converter(size)
    with _opened_video(path) as (container, stream):
        for frame in _decoded_frames(container, stream, path):
            if count in wanted:
                frames[count] = to_rgb(frame)
            count += 1
            if count > last:
                break
    if last not in frames:
        raise DecodeError(f"frame {last} requested, but the video has only {count} frames")
    return np.stack([frames[i] for i in indices])  # [T, H, W, 3]


def decord_reader(path: str | Path, size: tuple[int, int] | None = None, threads: int = 1):
    """threads: decord's decoding threads (0: FFmpeg's choice). One, like PyAV here: data-loader workers fill the
    cores, and a file is read the way ingestion verified it."""
    import decord  # lazy: a native library that only the decord path needs

    decord.bridge.set_bridge("native")
    decord.logging.set_level(decord.logging.QUIET)  # FFmpeg warnings would flood data-loader workers' stderr
    height, width = size if size is not None else (-1, -1)
    try:
        return decord.VideoReader(str(path), ctx=decord.cpu(0), width=width, height=height, num_threads=threads)
    except (decord.DECORDError, RuntimeError) as err:  # RuntimeError: files FFmpeg cannot open at all
        raise DecodeError(f"decord cannot open it: {decord_message(err)}") from None


def decord_message(err: Exception) -> str:
    """decord's errors read "[time] src/file.cc:151: [Check failed: ... ERROR ]<what>"; keep <what>."""
    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    line = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", line)
    return line.rpartition(" ERROR ")[2]


def _read_with_decord(path: str | Path, indices: list[int], size: tuple[int, int] | None) -> np.ndarray:
    import decord

    if size in _DECORD_CANNOT_RESIZE_TO:
        return _read_with_pyav(path, indices, size)
    reader = decord_reader(path, size)
    try:
        if max(indices) >= len(reader):
            raise DecodeError(f"frame {max(indices)} requested, but the video has only {len(reader)} frames")
        return reader.get_batch(indices).asnumpy()  # [T, H, W, 3]
    except decord.DECORDError as err:
        if size is not None and "size must exactly match" in str(err):
            return _resize_with_pyav_instead(path, indices, size)
        raise DecodeError(f"decord failed: {decord_message(err)}") from None
    finally:
        del reader  # decord has no close(): dropping the last reference frees the FFmpeg context now


# decord 0.6.0 cannot resize to some widths (measured: 8, 12, 16, 24, 48, 72 fail, 10, 32, 56, 112 work, whatever the
# source): its frame copy rejects FFmpeg's padded rows. PyAV gives the same frames there (bilinear, like decord).
_DECORD_CANNOT_RESIZE_TO: set[tuple[int, int]] = set()


def _resize_with_pyav_instead(path: str | Path, indices: list[int], size: tuple[int, int]) -> np.ndarray:
    if size not in _DECORD_CANNOT_RESIZE_TO:
        _DECORD_CANNOT_RESIZE_TO.add(size)
        warnings.warn(f"decord cannot resize to {size[0]}x{size[1]} (a decord 0.6.0 bug for some widths); PyAV "
                      f"decodes these clips instead, slower: pick another width to keep decord", stacklevel=4)
    return _read_with_pyav(path, indices, size)


def check_indices(probe: VideoProbe, max_checks: int, seed: int) -> list[int]:
    """Frames to compare between decoders: around keyframes (where seeking lands, and where decord goes wrong) and the
    last frame, up to two thirds of max_checks, then a third of seeded random ones. Not topped up with random frames
    where a video has few keyframes: each is a deep seek for decord (a one-keyframe video decodes from its start for
    every frame checked), and it is the keyframes that random access gets wrong."""
    rng = np.random.default_rng(seed)
    n = probe.num_frames
    near_keys = sorted({j for k in probe.keyframes for j in (k - 1, k, k + 1) if 0 <= j < n} | {n - 1})
    share = max(1, 2 * max_checks // 3)
    chosen = set(rng.choice(near_keys, size=min(share, len(near_keys)), replace=False).tolist())
    others = np.setdiff1d(np.arange(n), list(chosen))
    fill = min(max_checks - share, len(others))
    chosen |= set(rng.choice(others, size=fill, replace=False).tolist())
    return sorted(chosen)


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _decord_vs_pyav_diffs(path: str | Path, decord_frames: dict[int, np.ndarray]) -> dict[tuple[int, int], float]:
    """{(i, j): mean abs diff of decord frame i vs PyAV frame j} for j in i-1..i+1, streaming PyAV's frames once."""
    diffs, last, to_rgb = {}, max(decord_frames) + 1, _rgb_converter(None)
    with _opened_video(path) as (container, stream):
        for j, frame in enumerate(_decoded_frames(container, stream, path)):
            near = [i for i in (j - 1, j, j + 1) if i in decord_frames]
            if near:
                reference = to_rgb(frame)
                for i in near:
                    diffs[i, j] = _mean_abs_diff(decord_frames[i], reference)
            if j == last:
                break
    return diffs


def _frame_mismatch(i: int, diffs: dict[tuple[int, int], float]) -> str | None:
    own = diffs[i, i]
    if own > MAX_MEAN_ABS_DIFF:
        return f"frame {i} differs from PyAV's by {own:.2f} (mean abs, limit {MAX_MEAN_ABS_DIFF})"
    for j in (i - 1, i + 1):
        if (i, j) in diffs and diffs[i, j] < own:  # ties pass: a repeated frame is not a wrong frame
            return f"frame {i} looks like PyAV's frame {j} ({diffs[i, j]:.2f} vs {own:.2f})"
    return None


def choose_decoder(path: str | Path, probe: VideoProbe, max_checks: int = 24, seed: int = 0,
                   sample: list[int] | None = None) -> tuple[str, str]:
    """-> ("decord", "verified on N frames") if decord's random access matches PyAV on a sample, else ("pyav", why).
    PyAV's frames come from probe.captured where it kept them, else from a second pass."""
    import decord

    sample = sample if sample is not None else check_indices(probe, max_checks, seed)
    try:
        reader = decord_reader(path)
    except DecodeError as err:
        return "pyav", str(err)
    try:
        if len(reader) != probe.num_frames:
            return "pyav", f"decord counts {len(reader)} frames, PyAV decoded {probe.num_frames}"
        order = np.random.default_rng(seed).permutation(sample).tolist()  # random access is where decord breaks
        batch = reader.get_batch(order).asnumpy()  # [len(order), H, W, 3]
    except decord.DECORDError as err:
        return "pyav", f"decord failed reading frames: {decord_message(err)}"
    finally:
        del reader
    decoded = dict(zip(order, batch))
    needed = {j for i in sample for j in (i - 1, i, i + 1) if 0 <= j < probe.num_frames}
    if needed <= probe.captured.keys():
        diffs = {(i, j): _mean_abs_diff(decoded[i], probe.captured[j]) for i in sample for j in (i - 1, i, i + 1)
                 if j in needed}
    else:
        diffs = _decord_vs_pyav_diffs(path, decoded)
    for i in sample:
        mismatch = _frame_mismatch(i, diffs)
        if mismatch:
            return "pyav", f"decord random access is wrong: {mismatch}"
    return "decord", f"verified on {len(sample)} frames"
