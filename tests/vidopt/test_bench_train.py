"""The training-throughput bench: clips counted over all ranks, the steady state timed, and a real tiny run with a plain
PyTorch row, one in-process row and a 2-worker Ray Train row."""
import json

import pytest
import ray

from vidopt.bench import train


def test_clips_per_epoch_counts_every_rank_and_skips_a_last_batch_smaller_than_the_world():
    assert train.clips_per_epoch(42, 8, 1) == 42
    assert train.clips_per_epoch(42, 8, 2) == 42   # last batch of 2: one clip per rank
    assert train.clips_per_epoch(41, 8, 2) == 40   # last batch of 1 < 2 workers: every rank skips it
    assert train.clips_per_epoch(43, 8, 3) == 43   # last batch of 3: one clip per rank
    assert train.clips_per_epoch(43, 8, 4) == 40   # ... but 3 < 4 workers: skipped
    # rank 0's clips times the world would undercount: of each batch of 8, rank 0 of 3 trains 2
    rank0 = sum(len(b[train.shard(b, 0, 3)]) for b in train.global_batches(43, 8, seed=0))
    assert rank0 == 11 and 3 * rank0 == 33


def test_summarise_times_the_epochs_after_the_first():
    history = [{"epoch": 0, "train_seconds": 10.0, "data_seconds": 5.0},
               {"epoch": 1, "train_seconds": 2.0, "data_seconds": 0.5},
               {"epoch": 2, "train_seconds": 2.0, "data_seconds": 0.1}]
    s = train.summarise(history, [40, 40, 40])
    assert s["epochs_timed"] == [2, 3] and s["clips"] == 80 and s["seconds"] == 4.0
    assert s["clips_per_s"] == pytest.approx(20.0) and s["data_wait_share"] == pytest.approx(0.15)
    assert s["gpu_busy"] is None
    one = train.summarise(history[:1], [40])   # --epochs 1: that epoch, warm-up and all
    assert one["epochs_timed"] == [1] and one["clips_per_s"] == pytest.approx(4.0)
    busy = train.summarise([{**e, "gpu_busy": b} for e, b in zip(history, (0.1, 0.9, 0.5))], [40, 40, 40])
    assert busy["gpu_busy"] == pytest.approx(0.7)   # weighted by each epoch's training time


@pytest.fixture
def own_ray():
    ray.shutdown()   # an earlier test's Ray may have other resources; the bench starts the pipeline's local Ray
    yield
    ray.shutdown()   # other tests start their own local Ray


@pytest.mark.integration
def test_bench_rows_per_worker_count_and_plain_baseline(sample_dir, tmp_path, own_ray):
    out = tmp_path / "report"
    report = train.main(["--profile", "tiny", "--workers", "1", "2", "--epochs", "2", "--device", "cpu",
                         "--project-dir", str(tmp_path / "project"), "--out", str(out), f"data.source={sample_dir}"])

    assert json.loads((out / "train.json").read_text()) == report
    rows = report["rows"]
    assert [(r["launcher"], r["world_size"]) for r in rows] == [
        (train.PLAIN, 1), (train.IN_PROCESS, 1), (train.RAY_TRAIN, 2)]
    n = report["setup"]["train_videos"]
    for row in rows:
        assert row["device"] == "cpu" and row["precision"] == "fp32" and row["gpu_busy"] is None
        assert row["clips_per_s"] > 0 and 0 <= row["data_wait_share"] <= 1
        assert row["epochs_timed"] == [2] and row["clips"] == n   # 42 train videos: every clip, any world size
        assert row["share_of_plain"] == pytest.approx(row["clips_per_s"] / rows[0]["clips_per_s"])
    ray_row = rows[2]
    assert ray_row["rank0_clips"] == [n // 2, n // 2]   # rank 0 trained half: two workers really ran
    assert not list((tmp_path / "project" / "bench" / "train" / "runs").iterdir())   # run folders cleaned up
    table = (out / "train.md").read_text()
    assert table.startswith("## Teacher training throughput") and report["command"] in table
    for name in (train.PLAIN, train.IN_PROCESS, train.RAY_TRAIN):
        assert f"| {name} |" in table
    assert not ray.is_initialized()   # the bench stopped the Ray it started
