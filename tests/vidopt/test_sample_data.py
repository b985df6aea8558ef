"""Synthetic motion dataset: deterministic bytes, layout, decodable H.264, and only motion separates paired classes."""
import hashlib
from pathlib import Path

import av
import numpy as np
import pytest
from pydantic import ValidationError

from vidopt.sample_data import (
    CLASSES,
    SampleSpec,
    generate_dataset,
    render_video,
    render_video_with_mask,
    video_rng,
    write_mp4,
)

TINY = dict(videos_per_class=2, frames=8, height=32, width=48)  # small but not square, so H/W mix-ups show


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> tuple[Path, dict[str, int], list[tuple[int, int]]]:
    root = tmp_path_factory.mktemp("tiny")
    calls: list[tuple[int, int]] = []
    counts = generate_dataset(root, SampleSpec(**TINY), progress=lambda done, total: calls.append((done, total)))
    return root, counts, calls


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tiny_dataset, tmp_path):
    root, _, _ = tiny_dataset
    generate_dataset(tmp_path / "again", SampleSpec(**TINY))
    generate_dataset(tmp_path / "other", SampleSpec(**TINY, seed=1))
    first, again, other = _hashes(root), _hashes(tmp_path / "again"), _hashes(tmp_path / "other")
    assert first == again
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first)
    # in two processes, the same files
    generate_dataset(tmp_path / "parallel", SampleSpec(**TINY), workers=2)
    assert _hashes(tmp_path / "parallel") == first
    # one video never depends on another: generated alone, it is the same file
    generate_dataset(tmp_path / "alone", SampleSpec(**{**TINY, "videos_per_class": 1, "classes": ["zoom_out"]}))
    assert _hashes(tmp_path / "alone") == {"zoom_out/zoom_out_0000.mp4": first["zoom_out/zoom_out_0000.mp4"]}


def test_encoding_does_not_depend_on_what_was_encoded_before(tmp_path):
    # Regression: with x264's mbtree on, identical frames encoded to different bytes depending on earlier encodes.
    spec = SampleSpec(frames=16)
    clips = [render_video(label, video_rng(3, label, 0), spec) for label in CLASSES]
    digests = []
    for order in (range(len(clips)), reversed(range(len(clips))), range(len(clips))):
        for i in order:
            write_mp4(clips[i], tmp_path / f"{i}.mp4", fps=15)
            digests.append((i, _sha256(tmp_path / f"{i}.mp4")))
    assert len(set(digests)) == len(clips)


def test_layout_counts_and_every_file_decodes(tiny_dataset):
    root, counts, calls = tiny_dataset
    assert counts == {label: 2 for label in CLASSES}
    assert calls[-1] == (16, 16) and len(calls) == 16
    files = sorted(p for p in root.rglob("*") if p.is_file())
    expected = sorted(f"{label}/{label}_{i:04d}.mp4" for label in CLASSES for i in range(2))
    assert [str(p.relative_to(root)) for p in files] == expected
    for path in files:  # also proves no temp files were left behind
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            assert stream.codec_context.name == "h264"
        assert len(frames) == 8 and frames[0].shape == (32, 48, 3)


def test_refuses_stray_videos_and_bad_specs(tmp_path):
    (tmp_path / "zoom_in").mkdir()
    (tmp_path / "zoom_in" / "mine.mp4").write_bytes(b"")
    with pytest.raises(FileExistsError, match="mine.mp4"):
        generate_dataset(tmp_path, SampleSpec(**TINY))
    with pytest.raises(ValidationError):
        SampleSpec(width=95)  # odd: yuv420p cannot hold it
    with pytest.raises(ValidationError):
        SampleSpec(classes=["move_left", "jump"])


def _pooled(label: str, statistic, videos: int = 200) -> np.ndarray:
    """statistic(main-object coverage [T, H, W]) -> [T], for `videos` rendered clips: [videos, T]."""
    spec = SampleSpec(frames=16, height=48, width=48)
    return np.stack([statistic(render_video_with_mask(label, video_rng(7, label, i), spec)[1]) for i in range(videos)])


def _centroid_x(alpha: np.ndarray) -> np.ndarray:
    return (alpha * np.arange(alpha.shape[2])).sum(axis=(1, 2)) / alpha.sum(axis=(1, 2))


def _log_area(alpha: np.ndarray) -> np.ndarray:
    return np.log(alpha.sum(axis=(1, 2)))


def _assert_same_distribution(a: np.ndarray, b: np.ndarray, tolerance: float) -> None:
    """Deciles of the pooled per-frame values agree within tolerance, while the values really do spread out.

    Tolerances are ~2-3x the largest decile gap seen between two seeds of the same class at 200 videos.
    """
    deciles = np.linspace(0.1, 0.9, 9)
    qa, qb = np.quantile(a.ravel(), deciles), np.quantile(b.ravel(), deciles)
    assert np.abs(qa - qb).max() < tolerance, (qa, qb)
    assert qa[-1] - qa[0] > 5 * tolerance  # otherwise "indistinguishable" would be trivially true


def test_single_frames_cannot_tell_left_from_right_but_motion_can():
    left, right = _pooled("move_left", _centroid_x), _pooled("move_right", _centroid_x)
    _assert_same_distribution(left, right, tolerance=0.05 * 48)
    assert (np.diff(right, axis=1) > 0).mean() > 0.98
    assert (np.diff(left, axis=1) < 0).mean() > 0.98


def test_single_frames_cannot_tell_zoom_in_from_out_but_motion_can():
    zoom_in, zoom_out = _pooled("zoom_in", _log_area), _pooled("zoom_out", _log_area)
    _assert_same_distribution(zoom_in, zoom_out, tolerance=0.25)  # log area: 0.25 is a 28% area difference
    assert (np.diff(zoom_in, axis=1) > 0).mean() > 0.98
    assert (np.diff(zoom_out, axis=1) < 0).mean() > 0.98
