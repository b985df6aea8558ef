import numpy as np
import pytest

from vidopt.config import ClipConfig
from vidopt.data import class_counts, data_version, eval_windows, sample_clip_indices, split_for_hash


def _hash(i: int) -> str:
    import hashlib

    return hashlib.sha256(str(i).encode()).hexdigest()


def test_split_follows_content_hash_and_fractions():
    splits = [split_for_hash(_hash(i), (0.7, 0.15, 0.15)) for i in range(40000)]
    fractions = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    assert abs(fractions["train"] - 0.7) < 0.01 and abs(fractions["test"] - 0.15) < 0.01  # ~4 sigma
    assert split_for_hash(_hash(3), (0.7, 0.15, 0.15)) == splits[3]
    assert {split_for_hash(_hash(i), (0.0, 0.0, 1.0)) for i in range(50)} == {"test"}


def test_data_version_depends_on_content_not_order_or_location():
    rows = [{"sha256": _hash(i), "label": "a", "split": "train", "uri": f"s3://x/{i}"} for i in range(5)]
    moved = [{**r, "uri": "elsewhere"} for r in reversed(rows)]
    assert data_version(rows) == data_version(moved)
    assert data_version(rows) != data_version(rows[:4])
    assert data_version(rows) != data_version([{**rows[0], "label": "b"}, *rows[1:]])


def test_class_counts():
    rows = [{"label": "a", "split": "train"}, {"label": "a", "split": "test"}, {"label": "b", "split": "train"}]
    assert class_counts(rows) == {"a": {"train": 1, "val": 0, "test": 1, "total": 2},
                                  "b": {"train": 1, "val": 0, "test": 0, "total": 1}}


def test_training_clips_are_random_contiguous_windows():
    rng = np.random.default_rng(0)
    clips = [sample_clip_indices(40, 8, 2, train=True, rng=rng) for _ in range(200)]
    assert all(len(c) == 8 and np.all(np.diff(c) == 2) and 0 <= c[0] and c[-1] < 40 for c in clips)
    assert len({c[0] for c in clips}) > 10  # offsets vary


def test_eval_clips_are_uniform_and_deterministic():
    assert sample_clip_indices(40, 8, 1, train=False) == list(range(16, 24))  # centre
    starts = [sample_clip_indices(40, 8, 1, train=False, clip=k, clips=4)[0] for k in range(4)]
    assert starts == sorted(starts) and starts[0] < 8 and starts[-1] > 24


def test_evaluation_scores_a_video_on_as_many_windows_as_its_length_holds():
    clips = ClipConfig(frames=8, stride=4, eval_clips_per_video=3)          # a clip spans 29 frames
    windows = {n: eval_windows({"num_frames": n}, clips) for n in (20, 32, 58, 59, 73, 74, 142)}
    # k windows lie (frames - 29) / k apart: at least 15 (half a clip) for k of them
    assert windows == {20: 1, 32: 1, 58: 1, 59: 2, 73: 2, 74: 3, 142: 3}
    # clips.seconds: 2 s at 10 fps is 21 frames (step 3), at 30 fps 61 (step 9): the same 60-frame count differs
    timed = clips.model_copy(update={"seconds": 2.0})
    assert eval_windows({"num_frames": 60, "fps": 10.0}, timed) == 3
    assert eval_windows({"num_frames": 60, "fps": 30.0}, timed) == 1
    assert eval_windows({"num_frames": 142}, clips.model_copy(update={"eval_clips_per_video": 1})) == 1
    from vidopt.data import ClipDataset

    rows = [{"num_frames": n, "label": "a", "path": f"{n}.mp4"} for n in (32, 142)]
    assert [item[:2] for item in ClipDataset(rows, ["a"], clips, train=False).items] == [(0, 0), (1, 0), (1, 1), (1, 2)]
    assert len(ClipDataset(rows, ["a"], clips, train=True)) == 2
    assert len(ClipDataset(rows, ["a"], clips, train=False, per_video=4)) == 8   # fixed training clips (distill)


def test_short_video_shrinks_stride_and_an_empty_one_fails():
    assert sample_clip_indices(10, 8, 4, train=False) == list(range(1, 9))
    with pytest.raises(ValueError, match="video has 0 frames"):
        sample_clip_indices(0, 8, 1, train=False)


def test_clip_loader_yields_normalised_batches_from_real_videos(sample_dir, tiny_cfg):
    from pathlib import Path

    import torch

    from tasks.ingest import run as ingest
    from vidopt.data import ClipDataset
    from vidopt.storage import read_jsonl

    cfg = tiny_cfg(f"data.source={sample_dir}", "clips.loader_workers=2", "clips.eval_clips_per_video=2")
    dataset = ingest(cfg)
    rows = read_jsonl(Path(dataset.manifest_uri))
    loader = torch.utils.data.DataLoader(ClipDataset(rows, dataset.classes, cfg.clips, train=True),
                                         batch_size=cfg.clips.batch_size, num_workers=2)
    x, y, v = next(iter(loader))
    c = cfg.clips
    assert x.shape == (c.batch_size, 3, c.frames, c.height, c.width) and x.dtype == torch.float32
    assert -3 < float(x.mean()) < 3 and 0.2 < float(x.std()) < 3  # standardised, not raw 0..255
    assert all(dataset.classes[int(label)] == rows[int(video)]["label"] for label, video in zip(y, v))

    train = ClipDataset(rows, dataset.classes, c, train=True)
    firsts = []
    for epoch in range(4):
        train.epoch = epoch
        firsts.append(train[0][0])
    assert any(not torch.equal(firsts[0], f) for f in firsts[1:])  # a new random window each epoch
    evaluation = ClipDataset(rows, dataset.classes, c, train=False)
    assert len(evaluation) == 2 * len(rows) and torch.equal(evaluation[1][0], evaluation[1][0])
    assert not torch.equal(evaluation[0][0], evaluation[1][0])  # two windows of one video differ


def test_training_videos_that_fit_in_memory_are_decoded_once_with_the_same_clips(sample_dir, tiny_cfg):
    from pathlib import Path

    import torch

    from tasks.ingest import run as ingest
    from vidopt.data import ClipDataset, FrameStore
    from vidopt.storage import read_jsonl

    cfg = tiny_cfg(f"data.source={sample_dir}")
    dataset = ingest(cfg)
    rows = read_jsonl(Path(dataset.manifest_uri))[:6]
    store = FrameStore.decode_if_fits(rows, cfg.clips)
    assert store is not None and [len(v) for v in store.videos] == [r["num_frames"] for r in rows]
    streamed = ClipDataset(rows, dataset.classes, cfg.clips, train=True, seed=3)
    cached = ClipDataset(rows, dataset.classes, cfg.clips, train=True, seed=3, store=store)
    for epoch in (0, 1):
        streamed.epoch = cached.epoch = epoch
        for item in range(len(rows)):
            assert torch.equal(streamed[item][0], cached[item][0])  # same window, same pixels
    small = cfg.clips.model_copy(update={"memory_cache_mb": 0})
    assert FrameStore.decode_if_fits(rows, small) is None  # too big for the budget: streamed from the files


def test_short_videos_are_padded_with_their_last_frame_and_clips_span_seconds_at_any_frame_rate():
    from vidopt.config import ClipConfig
    from vidopt.data import clip_stride, sample_clip_indices

    assert sample_clip_indices(5, 8, 2, train=False) == [0, 1, 2, 3, 4, 4, 4, 4]
    assert sample_clip_indices(5, 8, 2, train=True, rng=np.random.default_rng(0)) == [0, 1, 2, 3, 4, 4, 4, 4]
    clips = ClipConfig(frames=8, seconds=1.4)
    assert [clip_stride({"fps": fps}, clips) for fps in (10, 30)] == [2, 6]   # 1.4 s either way
    assert clip_stride({"fps": 30}, ClipConfig(frames=8, stride=3)) == 3      # no seconds: the stride as set


def test_a_wide_video_is_scaled_with_its_aspect_kept_then_cropped(tmp_path):
    """A 48x80 video for 32x32 clips: decoded at 32x53, the centre 32x32 taken at evaluation, a random window of
    that size in training; `squash` scales each side instead."""
    import torch

    from vidopt.config import ClipConfig
    from vidopt.data import ClipDataset, decode_size
    from vidopt.sample_data import SampleSpec, generate_dataset
    from vidopt.video import probe_video, read_frames

    generate_dataset(tmp_path, SampleSpec(videos_per_class=1, frames=16, height=48, width=80,
                                          classes=["move_left"]), workers=1)
    path = next(tmp_path.rglob("*.mp4"))
    probe = probe_video(path)
    row = {"path": str(path), "label": "move_left", "decoder": "pyav", **probe.to_dict()}
    clips = ClipConfig(frames=4, stride=2, height=32, width=32, eval_clips_per_video=1)
    assert decode_size(row, clips) == (32, 53)
    assert decode_size(row, clips.model_copy(update={"resize": "squash"})) == (32, 32)
    evaluated = ClipDataset([row], ["move_left"], clips, train=False, normalise=False)[0][0]
    centre = sample_clip_indices(probe.num_frames, 4, 2, train=False)
    whole = read_frames(path, centre, size=(32, 53))
    assert evaluated.shape == (4, 32, 32, 3) and torch.equal(evaluated, torch.from_numpy(whole[:, :, 10:42]))
    trained = ClipDataset([row], ["move_left"], clips, train=True, normalise=False)
    windows = set()
    for epoch in range(6):
        trained.epoch = epoch
        clip = trained[0][0]
        assert clip.shape == (4, 32, 32, 3)
        windows.add(tuple(clip[0, 0, :, 0].tolist()))
    assert len(windows) > 1   # the window moves from epoch to epoch


def test_stratified_splits_give_every_class_its_share_and_a_minimum_of_val_and_test():
    from vidopt.data import assign_splits

    rows = [{"sha256": _hash(i), "label": label} for label, n in (("big", 40), ("small", 3), ("one", 1)) for i in
            range(n * 1000, n * 1000 + n)]
    assign_splits(rows, (0.7, 0.15, 0.15), stratify=True, min_videos=1)
    counts = class_counts(rows)
    assert (counts["big"]["train"], counts["big"]["val"], counts["big"]["test"]) == (28, 6, 6)
    assert (counts["small"]["train"], counts["small"]["val"], counts["small"]["test"]) == (1, 1, 1)
    assert counts["one"]["train"] == 1   # too few for a val and a test video: it trains
    again = [dict(r) for r in rows]
    assign_splits(again, (0.7, 0.15, 0.15))
    assert [r["split"] for r in again] == [r["split"] for r in rows]   # deterministic: the hashes decide
    assign_splits(again, (1.0, 0.0, 0.0))
    assert {r["split"] for r in again} == {"train"}   # no minimum for a split asked to be empty


def test_folds_are_stratified_and_test_every_video_once():
    from vidopt.data import assign_fold

    rows = [{"sha256": f"{i:064x}"[::-1], "label": "ab"[i % 2]} for i in range(20)]   # 10 per class
    tested = []
    for fold in range(5):
        split = assign_fold(rows, 5, fold, (0.7, 0.15, 0.15), min_videos=1)
        test = [r for r in split if r["split"] == "test"]
        assert sorted(r["label"] for r in test) == ["a", "a", "b", "b"]
        # of the 8 left per class, 0.15 / 0.85 of them (1.4 -> 1) are val
        assert sorted(r["label"] for r in split if r["split"] == "val") == ["a", "b"]
        tested += [r["sha256"] for r in test]
    assert sorted(tested) == sorted(r["sha256"] for r in rows)
    assert "split" not in rows[0]                    # the caller's rows are left as they were
    with pytest.raises(ValueError, match="fold 5 of 5"):
        assign_fold(rows, 5, 5, (0.7, 0.15, 0.15))
