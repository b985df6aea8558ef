"""Deterministic synthetic motion videos, `<out>/<label>/<label>_<index>.mp4` (H.264): one class per kind of motion.
No single frame tells the classes apart, only motion over time does, so a model must use the temporal axis to score."""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import zlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from vidopt.processes import spawn_pool

# Each paired class is the time reversal of its partner: same sampler, frames played backwards. So the frames of a
# move_left clip, pooled over the clip, have exactly the distribution of a move_right clip's, and so on for every pair.
# A fixed frame index is not symmetric (move_right clips start left of centre on average): only where in the clip a
# frame sits gives that away, which is why clip samplers should pick random offsets.
MOTIONS: dict[str, tuple[str, bool]] = {  # label -> (motion sampler, time-reversed)
    "move_left": ("move_x", True),
    "move_right": ("move_x", False),
    "move_up": ("move_y", True),
    "move_down": ("move_y", False),  # image y grows downwards
    "rotate_cw": ("rotate", False),  # angle grows; with y down that is clockwise on screen
    "rotate_ccw": ("rotate", True),
    "zoom_in": ("zoom", False),
    "zoom_out": ("zoom", True),
}
CLASSES: tuple[str, ...] = tuple(MOTIONS)
SHAPES = ("disc", "notched_disc", "square", "triangle", "cross", "star", "bar")
BACKGROUNDS = ("smooth", "stripes", "checker")


class SampleSpec(BaseModel):
    """What to generate. The defaults, 8 classes x 24 videos x 32 frames at 96x96 (6144 frames), take ~10 s."""

    model_config = ConfigDict(extra="forbid")

    videos_per_class: int = Field(24, ge=1)  # the split into train/val/test happens downstream, at ingest
    frames: int = Field(32, ge=2)  # frames per video; longer clips give clip samplers room for random offsets
    height: int = Field(96, ge=16)  # pixels; even, since H.264 yuv420p halves chroma resolution
    width: int = Field(96, ge=16)
    fps: int = Field(15, ge=1)  # only the container timestamps; motion is defined per frame
    seed: int = 0
    noise_std: float = Field(6.0, ge=0.0)  # per-pixel gaussian noise, uint8 units; also defeats exact-pixel shortcuts
    distractors: int = Field(2, ge=0)  # max distractor objects per video (0..distractors, random-walking)
    classes: list[str] = Field(default_factory=lambda: list(CLASSES))

    @field_validator("height", "width")
    @classmethod
    def _even(cls, value: int) -> int:
        if value % 2:
            raise ValueError(f"must be even for H.264 yuv420p, got {value}")
        return value

    @field_validator("classes")
    @classmethod
    def _known_classes(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(CLASSES))
        if unknown or not value or len(set(value)) != len(value):
            raise ValueError(f"classes must be distinct names from {CLASSES}, got {value}")
        return value


@dataclass(frozen=True)
class Track:
    """One object's pose per frame: centre (px), angle (rad), radius (px); each an array of length T."""

    cx: np.ndarray
    cy: np.ndarray
    angle: np.ndarray
    scale: np.ndarray

    def reversed(self) -> Track:
        return Track(cx=self.cx[::-1], cy=self.cy[::-1], angle=self.angle[::-1], scale=self.scale[::-1])


def sample_main_track(motion: str, rng: np.random.Generator, spec: SampleSpec) -> Track:
    """The forward motion of the main object; it stays mostly inside the frame (centre >= one radius from each edge)."""
    T, H, W = spec.frames, spec.height, spec.width
    t = np.linspace(0.0, 1.0, T)  # clip time, 0 at the first frame, 1 at the last
    angle0 = rng.uniform(0, 2 * np.pi)
    if motion == "zoom":
        small = rng.uniform(0.07, 0.11) * min(H, W)  # radius at the small end, px
        scale = small * rng.uniform(1.6, 2.3) ** t  # geometric, so every frame grows by the same factor
        cx, cy = rng.uniform(scale[-1], W - scale[-1]), rng.uniform(scale[-1], H - scale[-1])
        return Track(cx=np.full(T, cx), cy=np.full(T, cy), angle=np.full(T, angle0), scale=scale)
    radius = rng.uniform(0.11, 0.18) * min(H, W)
    scale = np.full(T, radius)
    if motion == "rotate":
        speed = np.deg2rad(rng.uniform(4.0, 10.0)) * (T - 1)  # total turn over the clip; 4-10 degrees per frame
        cx, cy = rng.uniform(radius, W - radius), rng.uniform(radius, H - radius)
        return Track(cx=np.full(T, cx), cy=np.full(T, cy), angle=angle0 + speed * t, scale=scale)
    along, across = (W, H) if motion == "move_x" else (H, W)
    travel = rng.uniform(0.35, 0.8) * (along - 2 * radius)  # varied speeds: a third to most of the free span
    start = rng.uniform(radius, along - radius - travel)
    moving, fixed = start + travel * t, np.full(T, rng.uniform(radius, across - radius))
    cx, cy = (moving, fixed) if motion == "move_x" else (fixed, moving)
    return Track(cx=cx, cy=cy, angle=np.full(T, angle0), scale=scale)


def sample_distractor_track(rng: np.random.Generator, spec: SampleSpec, radius: float) -> Track:
    """A random walk with jitter: no consistent direction, sense of turn or growth, so it never looks like a class."""
    T, H, W = spec.frames, spec.height, spec.width
    steps = rng.normal(0.0, 1.2, size=(2, T))  # px per frame
    steps[:, 0] = [rng.uniform(radius, W - radius), rng.uniform(radius, H - radius)]  # the start, so cumsum = path
    cx, cy = np.cumsum(steps, axis=1)
    angle = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0.0, 0.1, T))  # rad per frame
    scale = radius * np.exp(rng.normal(0.0, 0.03, T))  # jitter in size, no trend
    return Track(cx=_fold(cx, radius, W - radius), cy=_fold(cy, radius, H - radius), angle=angle, scale=scale)


def _fold(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Reflect a walk back into [lo, hi] at the walls (a triangle wave), so distractors bounce instead of leaving."""
    span = max(hi - lo, 1e-6)
    y = np.mod(x - lo, 2 * span)
    return lo + np.where(y > span, 2 * span - y, y)


def shape_distance(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance-like field in object units (radius ~1): negative inside. u, v: [T, H, W] object coordinates."""
    r = np.hypot(u, v)
    if shape == "disc":
        return r - 1.0
    if shape == "notched_disc":
        return np.maximum(r - 1.0, 0.4 - np.hypot(u + 1.0, v))
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.8
    if shape == "triangle":  # tip at angle 0; edges' outward normals at 180 and +-60 degrees, inradius 0.5
        return np.maximum(-u, np.maximum(0.5 * u + 0.866 * v, 0.5 * u - 0.866 * v)) - 0.5
    if shape == "cross":
        return np.minimum(np.maximum(np.abs(u) - 1.0, np.abs(v) - 0.3), np.maximum(np.abs(v) - 1.0, np.abs(u) - 0.3))
    if shape == "star":  # five points, one at angle 0
        return r - (0.45 + 0.55 * np.abs(np.cos(2.5 * np.arctan2(v, u))) ** 3)
    if shape == "bar":
        return np.maximum(np.abs(u) - 1.0, np.abs(v) - 0.35)
    raise ValueError(f"sample_data: unknown shape {shape!r}; choose from {SHAPES}")


def object_box(track: Track, height: int, width: int) -> tuple[slice, slice]:
    """The rows and columns an object touches over the whole clip (every shape fits in 1.2 radii, +1 px edge ramp).

    Drawing only there is what makes rendering fast: a distractor covers a few percent of the frame.
    """
    reach = 1.2 * float(track.scale.max()) + 1.0
    rows = slice(max(0, int(track.cy.min() - reach)), min(height, int(np.ceil(track.cy.max() + reach)) + 1))
    cols = slice(max(0, int(track.cx.min() - reach)), min(width, int(np.ceil(track.cx.max() + reach)) + 1))
    return rows, cols


def object_alpha(shape: str, track: Track, rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray]:
    """Anti-aliased coverage of the object and of its tip marker inside the box, each float32 [T, h, w] in [0, 1].

    The marker (a dot towards angle 0) makes every shape rotationally asymmetric, so the sense of rotation is visible.
    """
    ys, xs = np.arange(rows.start, rows.stop, dtype=np.float32), np.arange(cols.start, cols.stop, dtype=np.float32)
    cx, cy, scale = (np.asarray(a, np.float32)[:, None, None] for a in (track.cx, track.cy, track.scale))
    cos, sin = (f(np.asarray(track.angle, np.float32))[:, None, None] for f in (np.cos, np.sin))
    dx, dy = xs[None, None, :] - cx, ys[None, :, None] - cy  # [T, 1, w], [T, h, 1]
    u, v = (dx * cos + dy * sin) / scale, (dy * cos - dx * sin) / scale  # [T, h, w] object coordinates
    # distance * scale is in pixels; a one-pixel ramp around the edge is the anti-aliasing
    body = np.clip(0.5 - shape_distance(shape, u, v) * scale, 0.0, 1.0)
    marker = np.clip(0.5 - (np.hypot(u - 0.55, v) - 0.22) * scale, 0.0, 1.0) * body
    return body, marker


def render_background(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A random textured background, float32 [H, W, 3] in uint8 units, and its base colour [3]."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) / max(height, width)
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    theta = rng.uniform(0, np.pi)
    along, across = xs * np.cos(theta) + ys * np.sin(theta), ys * np.cos(theta) - xs * np.sin(theta)
    if kind == "smooth":  # a few low-frequency waves in random directions: cheap smooth noise
        k = rng.uniform(1.0, 4.0, size=(4, 2)) * rng.choice([-1, 1], size=(4, 2)) * 2 * np.pi
        phase = rng.uniform(0, 2 * np.pi, size=4)
        field = sum(np.sin(xs * k[i, 0] + ys * k[i, 1] + phase[i]) for i in range(4)) / 8 + 0.5
    elif kind == "stripes":
        field = 0.5 + 0.5 * np.sin(along * 2 * np.pi * rng.uniform(3.0, 10.0) + rng.uniform(0, 2 * np.pi))
    else:
        cells = rng.uniform(3.0, 8.0) * np.pi
        field = (np.sin(along * cells) * np.sin(across * cells) > 0).astype(np.float32)
    base = rng.uniform(40.0, 215.0, size=3)
    second = np.clip(base + rng.uniform(-45.0, 45.0, size=3), 0.0, 255.0)  # low contrast: objects must stand out
    return (base + (second - base) * field[..., None]).astype(np.float32), base


def sample_object_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random colour at least 70 (mean abs, uint8 units) away from the background's base colour."""
    while True:
        colour = rng.uniform(0.0, 255.0, size=3)
        if np.abs(colour - background).mean() >= 70.0:
            return colour


def composite(frames: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    """Paint colour over frames [T, h, w, 3] (in place) with coverage alpha [T, h, w]."""
    a = alpha[..., None]
    frames *= 1.0 - a
    frames += a * colour.astype(np.float32)


def paint_object(frames: np.ndarray, shape: str, track: Track, colour: np.ndarray) -> np.ndarray:
    """Paint one object and its tip marker into frames [T, H, W, 3] in place; returns its coverage [T, H, W]."""
    T, H, W, _ = frames.shape
    rows, cols = object_box(track, H, W)
    body, marker = object_alpha(shape, track, rows, cols)
    region = frames[:, rows, cols]  # a view: painting it paints frames
    composite(region, body, colour)
    composite(region, marker, np.full(3, 20.0 if colour.mean() > 127 else 235.0))  # dark tip on light body, or light
    coverage = np.zeros((T, H, W), np.float32)
    coverage[:, rows, cols] = body
    return coverage


def render_video_with_mask(label: str, rng: np.random.Generator, spec: SampleSpec) -> tuple[np.ndarray, np.ndarray]:
    """One clip: uint8 frames [T, H, W, 3] and the main object's coverage float32 [T, H, W] (what tests measure)."""
    if label not in MOTIONS:
        raise ValueError(f"sample_data: unknown class {label!r}; choose from {CLASSES}")
    motion, time_reversed = MOTIONS[label]
    T, H, W = spec.frames, spec.height, spec.width
    background, base = render_background(rng, H, W)
    frames = np.broadcast_to(background, (T, H, W, 3)).copy()
    track = sample_main_track(motion, rng, spec)
    track = track.reversed() if time_reversed else track
    for _ in range(rng.integers(spec.distractors + 1)):  # drawn first: the main object stays on top
        distractor = sample_distractor_track(rng, spec, radius=rng.uniform(0.05, 0.09) * min(H, W))
        paint_object(frames, SHAPES[rng.integers(len(SHAPES))], distractor, sample_object_colour(rng, base))
    body = paint_object(frames, SHAPES[rng.integers(len(SHAPES))], track, sample_object_colour(rng, base))
    if spec.noise_std > 0:
        frames += rng.standard_normal(frames.shape, dtype=np.float32) * np.float32(spec.noise_std)
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8), body


def render_video(label: str, rng: np.random.Generator, spec: SampleSpec) -> np.ndarray:
    """One clip of class `label` as uint8 [T, H, W, 3] (RGB)."""
    return render_video_with_mask(label, rng, spec)[0]


def write_mp4(frames: np.ndarray, path: Path, fps: int) -> None:
    """Encode uint8 RGB [T, H, W, 3] as H.264 yuv420p mp4; atomic on success.

    The same frames give the same bytes with the same FFmpeg build; across CPUs and builds that is not promised
    (nor are numpy's sin/cos bit-exact across CPUs, so the rendered frames may differ by a rounding there too).
    """
    import av  # here, not at the top: vidopt.config imports this module, and export hosts need no video library
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".mp4.part")
    os.close(fd)
    try:
        with av.open(tmp, "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            stream.time_base = Fraction(1, fps)
            stream.thread_count = 1  # x264's output depends on its thread count, which by default follows the cores
            # mbtree=0: with it on, x264 reads uninitialised memory here and the same frames encoded to different
            # bytes from call to call (measured: the variation vanishes with mbtree=0, or when glibc's
            # MALLOC_PERTURB_ fixes what freed memory holds). veryfast: ~1300 frames/s at 96x96 on one core, 2x fast.
            stream.options = {"preset": "veryfast", "crf": "20", "x264-params": "mbtree=0"}
            for index, image in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")  # swscale -> yuv420p
                frame.pts = index
                container.mux(stream.encode(frame))
            container.mux(stream.encode())  # flush delayed frames
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def video_rng(seed: int, label: str, index: int) -> np.random.Generator:
    """Each video's own stream, from (seed, label, index): any one video can be regenerated alone."""
    return np.random.default_rng([seed, zlib.crc32(label.encode()), index])  # crc32: stable, unlike hash()


def generate_dataset(
    out_dir: Path, spec: SampleSpec, progress: Callable[[int, int], None] | None = None, workers: int = 1
) -> dict[str, int]:
    """Write every video of `spec` under out_dir/<label>/; returns videos written per class. `workers` > 1 renders
    and encodes in that many processes (each video is its own seeded stream and x264 runs single-threaded, so the
    files are the same bytes either way).

    Rewrites files that exist (same spec and seed give the same bytes). Refuses a directory holding other mp4s in a
    class folder, since they would silently join the dataset.
    """
    out_dir = Path(out_dir)
    names = {label: [f"{label}_{index:04d}.mp4" for index in range(spec.videos_per_class)] for label in spec.classes}
    for label, wanted in names.items():
        stray = sorted(p.name for p in (out_dir / label).glob("*.mp4") if p.name not in wanted)
        if stray:
            raise FileExistsError(
                f"sample_data: {out_dir / label}: holds {len(stray)} mp4 files not in this spec (e.g. {stray[0]}); "
                "use an empty output directory"
            )
    for label in names:
        (out_dir / label).mkdir(parents=True, exist_ok=True)
    videos = [(label, index, out_dir / label / name) for label, wanted in names.items()
              for index, name in enumerate(wanted)]
    for done, _ in enumerate(_write_videos(spec, videos, workers), 1):
        if progress is not None:
            progress(done, len(videos))
    return {label: len(wanted) for label, wanted in names.items()}


def _write_videos(spec: SampleSpec, videos: list[tuple[str, int, Path]], workers: int) -> Iterator[None]:
    """Write each (label, index, path), yielding once per video written, in order."""
    if workers <= 1:
        for video in videos:
            yield _write_video(spec, *video)
        return
    with spawn_pool(workers) as pool:   # a failed video (a full disk, say) cancels the queued ones
        for future in [pool.submit(_write_video, spec, *video) for video in videos]:
            yield future.result()


def _write_video(spec: SampleSpec, label: str, index: int, path: Path) -> None:
    write_mp4(render_video(label, video_rng(spec.seed, label, index), spec), path, spec.fps)


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic motion dataset: python -m vidopt.sample_data OUT")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--videos-per-class", type=int, default=SampleSpec().videos_per_class)
    parser.add_argument("--seed", type=int, default=SampleSpec().seed)
    parser.add_argument("--workers", type=int, default=1, help="processes rendering and encoding (one per core)")
    args = parser.parse_args()
    spec = SampleSpec(videos_per_class=args.videos_per_class, seed=args.seed)
    start = time.perf_counter()
    counts = generate_dataset(args.out_dir, spec, workers=args.workers)
    seconds = time.perf_counter() - start
    frames = sum(counts.values()) * spec.frames
    print(f"{args.out_dir}: {counts} in {seconds:.1f} s ({frames / seconds:.0f} frames/s)")


if __name__ == "__main__":
    main()
