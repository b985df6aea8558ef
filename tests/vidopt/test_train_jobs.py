"""Training jobs: each rank's share of every global batch, the device a worker picks, and data parallelism that is
exact: two gloo workers with half the global batch each take the same optimizer steps as one worker with all of it."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tests.conftest import free_port
from vidopt import train_jobs
from vidopt.models import StudentArch, build_model
from vidopt.store import ArtifactStore, store_for
from vidopt.shards import ShardedBatches, fixed_clip_fetch, global_batches, shard
from vidopt.train_jobs import (FixedClips, ModelSpec, Objective, Placement, Selection, TrainJob, pick_device,
                               run_train_job, store_weights)
from vidopt.training import FileCheckpoint

ARCH = StudentArch(frames=4, height=16, width=16, conv_widths=[8, 16], conv_strides=[2, 2], temporal_widths=[16],
                   pool_grid=2, num_classes=3)
CLIPS, BATCH = 40, 16      # batches of 16, 16 and 8: the last one uneven over 3 workers


def test_shards_partition_every_global_batch_and_skip_one_smaller_than_the_world():
    batches = global_batches(CLIPS, BATCH, seed=5)
    assert sorted(torch.cat(batches).tolist()) == list(range(CLIPS))
    order = lambda seed: torch.cat(global_batches(CLIPS, BATCH, seed)).tolist()  # noqa: E731
    assert order(5) == torch.cat(batches).tolist() != order(6)   # the same on every rank, new every epoch
    for world in (1, 2, 3):
        for batch in batches:
            rows = [shard(batch, rank, world) for rank in range(world)]
            assert torch.equal(torch.cat([batch[r] for r in rows]), batch)          # every row, once, in order
            assert max(r.stop - r.start for r in rows) - min(r.stop - r.start for r in rows) <= 1
    assert [shard(torch.arange(2), rank, 3) for rank in range(3)] == [None] * 3     # 2 clips, 3 workers: skipped


def _clip_set(n: int = CLIPS) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"clips": torch.randint(0, 256, (n, ARCH.frames, ARCH.height, ARCH.width, 3), dtype=torch.uint8,
                                   generator=g),
            "labels": torch.randint(0, ARCH.num_classes, (n,), generator=g), "videos": torch.arange(n)}


def test_two_ranks_see_exactly_one_workers_batches_and_augmentations():
    saved = _clip_set()
    fetch = fixed_clip_fetch(saved, None)

    def epoch(rank: int, world: int) -> list[tuple]:
        batches = ShardedBatches(CLIPS, BATCH, seed=3, rank=rank, world=world, augment=True, fetch=fetch)
        batches.start_epoch(2)
        return list(batches)

    whole, halves = epoch(0, 1), list(zip(epoch(0, 2), epoch(1, 2)))
    assert len(whole) == len(halves) == 3
    for one, (a, b) in zip(whole, halves):
        assert torch.equal(torch.cat([a[0], b[0]]), one[0]) and torch.equal(torch.cat([a[1], b[1]]), one[1])
        for key, value in one[4].items():   # each clip keeps the transform one worker would have drawn for it
            assert torch.equal(torch.cat([a[4][key], b[4][key]]), value), key
        # each rank's mean loss is weighed by its share, so that DDP's average of the ranks is the global mean: with
        # a loss of 1 per clip, both mean 1 and their weighed average is 1 however uneven the shares
        assert (float(a[3]) + float(b[3])) / 2 == pytest.approx(1.0) and float(one[3]) == 1.0


def test_a_worker_asked_for_a_gpu_without_cuda_trains_on_its_cpu_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level("WARNING", logger="vidopt.train"):
        device, note = pick_device("gpu")
    assert device.type == "cpu" and "CUDA is not available" in note and note in caplog.text
    assert pick_device("auto") == (torch.device("cpu"), "") and pick_device("cpu") == (torch.device("cpu"), "")


def small_job(root, epochs: int = 2) -> TrainJob:
    """A student trained on random clips, held in a local store at `root`."""
    store = store_for(str(root))
    torch.save(_clip_set(), root / "clips.pt")
    clips = store.put_file(root / "clips.pt", store.uri("clips.pt"))
    torch.manual_seed(0)
    start = store_weights(store, build_model(ARCH).state_dict(), store.uri("init.safetensors"))
    return TrainJob(stage="test", store=store.spec, run_dir=store.uri("run"), output=store.uri("out.safetensors"),
                    model=ModelSpec(arch=ARCH.model_dump(mode="json"), weights=start), data=FixedClips(clips=clips),
                    objective=Objective(loss="cross_entropy"),
                    selection=Selection(score="top1", clips=clips, name="train_top1"), augment=True, epochs=epochs,
                    lr=3e-3, weight_decay=1e-4, patience=10, batch_size=BATCH, seed=0,
                    placement=Placement(device="cpu", threads=1))


def _rank(rank: int, world: int, port: int, job_json: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    job = TrainJob.model_validate_json(job_json).model_copy(update={"output": out})
    run_train_job(job, FileCheckpoint(f"{out}.rank{rank}.pt"), rank, world)
    dist.destroy_process_group()


def test_two_gloo_workers_take_the_same_steps_as_one_worker(tmp_path):
    """Same seed, same data order, global batch 16: one worker, and two DDP workers with 8 clips each (BatchNorm
    synchronised, the uneven last batch weighed), end two epochs (6 AdamW steps) with the same weights."""
    job = small_job(tmp_path)
    one = run_train_job(job.model_copy(update={"output": str(tmp_path / "one.safetensors")}))
    assert one.world_size == 1 and one.epochs_run == 2
    two = str(tmp_path / "two.safetensors")
    mp.start_processes(_rank, args=(2, free_port(), job.model_dump_json(), two), nprocs=2, start_method="spawn")
    result = train_jobs.TrainResult.model_validate_json(ArtifactStore(job.store).read_text(f"{two}.json"))
    assert result.world_size == 2 and result.history[0]["clips"] == CLIPS // 2   # rank 0 trained on half
    a, b = load_file(tmp_path / "one.safetensors"), load_file(two)
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-5, worst
    # and the steps did something: a worker that ignored the other's gradients would end elsewhere
    start = load_file(tmp_path / "init.safetensors")
    assert max(float((a[k].float() - start[k].float()).abs().max()) for k in a) > 1e-2
