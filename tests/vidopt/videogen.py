"""Test helper: encode "barcode" videos whose every frame shows its own index, so any decoded frame can be checked.

The index is drawn as 10 big black/white blocks in Gray code (one block flips per frame, so no block flickers and lossy
codecs keep them clean); below it a noisy texture scrolls so encoders make real P/B frames with motion.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

BITS = 10  # up to 1024 frames
WIDTH, HEIGHT = 160, 128
BLOCK = WIDTH // BITS  # 16 px per bit
BAR_ROWS = 48  # barcode band height; the scrolling texture fills the rest
MARGIN = 4  # ignore block borders when reading a bit back: compression smears edges


@dataclass(frozen=True)
class Encoding:
    codec: str  # PyAV encoder name
    container: str  # file extension; PyAV picks the muxer from it
    options: dict[str, str] = field(default_factory=dict)
    max_b_frames: int | None = None
    pix_fmt: str = "yuv420p"


GOP = 12  # short GOP: many keyframes, so seeking paths get exercised

ENCODINGS = {
    "h264": Encoding("libx264", "mp4", {"preset": "veryfast", "crf": "18",
                                        "x264-params": f"keyint={GOP}:min-keyint={GOP}:bframes=3:scenecut=0"}),
    # x265's defaults include open GOPs (CRA + leading pictures): exactly where random access goes wrong.
    "hevc": Encoding("libx265", "mp4", {"preset": "ultrafast", "crf": "18",
                                        "x265-params": f"keyint={GOP}:min-keyint={GOP}:bframes=3:log-level=error"}),
    # auto-alt-ref makes hidden frames packed with visible ones.
    "vp9": Encoding("libvpx-vp9", "webm", {"g": str(GOP), "crf": "20", "b": "0", "deadline": "good",
                                           "cpu-used": "8", "auto-alt-ref": "1", "lag-in-frames": "16"}),
    # AVI stores no presentation timestamps: B-frames give out-of-order timing that demuxers must reconstruct.
    "mpeg4_avi": Encoding("mpeg4", "avi", {"g": str(GOP), "b": "1M"}, max_b_frames=2),
    # Temporal filtering would blend neighbouring frames' barcodes.
    "av1": Encoding("libsvtav1", "mp4", {"preset": "10", "crf": "24", "g": str(GOP), "svtav1-params": "enable-tf=0"}),
}


def barcode_frame(index: int, texture: np.ndarray) -> np.ndarray:
    """-> uint8 [HEIGHT, WIDTH, 3] RGB: Gray-coded `index` (MSB first) as blocks on top, the texture shifted below."""
    frame = np.empty((HEIGHT, WIDTH, 3), np.uint8)
    gray = index ^ (index >> 1)
    bits = [(gray >> (BITS - 1 - b)) & 1 for b in range(BITS)]
    frame[:BAR_ROWS] = np.repeat(np.array(bits, np.uint8) * 255, BLOCK)[None, :, None]
    frame[BAR_ROWS:] = np.roll(texture, shift=(index, 2 * index), axis=(0, 1))
    return frame


def read_barcode(frame: np.ndarray) -> int:
    """Index shown by a decoded RGB frame of any size; -1 if a block is neither clearly black nor clearly white."""
    height, width = frame.shape[:2]
    band = frame[: height * BAR_ROWS // HEIGHT].mean(axis=2)
    gray = 0
    for b in range(BITS):
        left, right = width * b // BITS, width * (b + 1) // BITS
        inset = max(1, (right - left) * MARGIN // BLOCK)
        level = band[inset:-inset, left + inset:right - inset].mean()
        if 90 < level < 165:  # a blend of two frames, or a broken picture
            return -1
        gray = (gray << 1) | int(level >= 128)
    index = 0
    while gray:
        index ^= gray
        gray >>= 1
    return index


def barcode_frames(num_frames: int, seed: int = 0) -> Iterator[np.ndarray]:
    """uint8 [HEIGHT, WIDTH, 3] RGB frames 0..num_frames-1, with fresh grain on the texture each frame."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 256, (HEIGHT - BAR_ROWS, WIDTH // 8, 3), dtype=np.uint8).repeat(8, axis=1)
    for index in range(num_frames):
        image = barcode_frame(index, texture)
        grain = rng.integers(-6, 7, image[BAR_ROWS:].shape)  # nothing is a perfect copy of its neighbour
        image[BAR_ROWS:] = np.clip(image[BAR_ROWS:] + grain, 0, 255)
        yield image


def still_frames(num_frames: int) -> Iterator[np.ndarray]:
    """A smooth gradient that brightens by one level per frame: neighbouring frames differ by ~1 level on average."""
    ramp = np.linspace(40, 200, WIDTH)[None, :, None] + np.linspace(0, 20, HEIGHT)[:, None, None]
    for index in range(num_frames):
        yield np.broadcast_to(ramp + index, (HEIGHT, WIDTH, 3)).clip(0, 255).astype(np.uint8)


def encode_frames(path: Path, encoding: Encoding, frames: Iterable[np.ndarray], fps: int = 25,
                  movflags: str | None = None) -> Path:
    """Encode uint8 [H, W, 3] RGB frames to `path` with the given encoder settings."""
    frames = iter(frames)
    first = next(frames)
    container_options = {"movflags": movflags} if movflags else {}
    with av.open(str(path), "w", options=container_options) as container:
        stream = container.add_stream(encoding.codec, rate=fps, options=dict(encoding.options))
        stream.height, stream.width = first.shape[:2]
        stream.pix_fmt = encoding.pix_fmt
        stream.thread_count = 1  # deterministic output
        if encoding.max_b_frames is not None:
            stream.codec_context.max_b_frames = encoding.max_b_frames
        for index, image in enumerate(itertools.chain([first], frames)):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index
            frame.time_base = Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def encode_barcode_video(path: Path, encoding: Encoding, num_frames: int, fps: int = 25, seed: int = 0,
                         movflags: str | None = None) -> Path:
    return encode_frames(path, encoding, barcode_frames(num_frames, seed), fps, movflags)


def encode_audio_only(path: Path, seconds: float = 1.0, rate: int = 16000) -> Path:
    """An mp4 holding one AAC stream of silence and no video."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate)
        for start in range(0, int(seconds * rate), 1024):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path
