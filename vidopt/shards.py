"""Each data-parallel rank's share of every global batch: the epoch's order and the augmentation are drawn for the
whole global batch as one worker would draw them, and each rank takes its rows, so any number of workers trains on
exactly what one worker would. Batches come from a decoded clip set, or as fresh random clips of the videos.
"""
from __future__ import annotations

from typing import Callable

import torch

from vidopt.augment import draw_augmentation, shard_augmentation
from vidopt.config import ClipConfig
from vidopt.data import ClipDataset, FrameStore
from vidopt.store import ArtifactStore, FileRef, StoreSpec


def global_batches(n: int, batch_size: int, seed: int, dataloader_order: bool = False) -> list[torch.Tensor]:
    """The epoch's order (seed: run seed + epoch) cut into global batches; the same on every rank. dataloader_order:
    the order a shuffling DataLoader draws from that generator, which first takes its workers' base seed from it
    (the teacher's videos: one seed keeps giving the same teacher)."""
    generator = torch.Generator().manual_seed(seed)
    if dataloader_order:
        torch.empty((), dtype=torch.int64).random_(generator=generator)
    order = torch.randperm(n, generator=generator)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def shard(batch: torch.Tensor, rank: int, world: int) -> slice | None:
    """Rank's contiguous rows of one global batch (sizes differ by at most one), or None when the batch is smaller
    than the world (then every rank skips it: a rank without rows would leave the others waiting in all-reduce)."""
    n = len(batch)
    if n < world:
        return None
    return slice(rank * n // world, (rank + 1) * n // world)


class ShardedBatches:
    """This rank's part of each global batch: (uint8 clips [b, T, H, W, C], labels [b], extra [b, ...], share), where
    share = b * world / global b weighs the rank's mean loss so that DDP's average is the global mean (uneven last
    batch), and the augmentation of the whole global batch is drawn and this rank's rows applied, so any number of
    workers trains on exactly what one worker would."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int, augment: bool,
                 fetch, pin: bool = False, dataloader_order: bool = False, hflip: bool = False):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.augment, self.fetch, self.pin, self.epoch = augment, fetch, pin, 0
        self.dataloader_order, self.hflip = dataloader_order, hflip

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self) -> list[tuple[torch.Tensor, slice]]:
        batches = global_batches(self.n, self.batch_size, self.seed + self.epoch, self.dataloader_order)
        return [(b, rows) for b in batches if (rows := shard(b, self.rank, self.world)) is not None]

    def __len__(self) -> int:
        return len(self.plan())

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        plan = self.plan()
        for (batch, rows), (clips, labels, extra) in zip(plan, self.fetch([b[r] for b, r in plan])):
            params = None
            if self.augment:   # drawn for the whole global batch, in the order one worker would draw them
                params = shard_augmentation(draw_augmentation(len(batch), 3, clips.shape[2], clips.shape[3],
                                                              generator, self.hflip), rows)
            if self.pin:
                clips = clips.pin_memory()
            yield clips, labels, extra, torch.tensor(len(clips) * self.world / len(batch)), params


def fixed_clip_fetch(saved: dict, logits: torch.Tensor | None):
    """Batches of a decoded clip set by index lists: (clips, labels, logits or video ids)."""
    def fetch(index_lists):
        for idx in index_lists:
            extra = logits[idx] if logits is not None else saved["videos"][idx]
            yield saved["clips"][idx], saved["labels"][idx], extra
    return fetch


def video_clip_fetch(rows: list[dict], classes: list[str], clips: ClipConfig, seed: int, loader_workers: int,
                     prefetch_batches: int, epoch_of: Callable[[], int]) -> Callable:
    """Batches of fresh random clips of manifest videos: decoded in DataLoader processes a few batches ahead, or once
    up front (FrameStore) when the videos fit in clips.memory_cache_mb."""
    store = FrameStore.decode_if_fits(rows, clips)
    dataset = ClipDataset(rows, classes, clips, train=True, seed=seed, normalise=False, store=store)
    workers = 0 if store is not None else loader_workers

    def fetch(index_lists):
        dataset.epoch = epoch_of()
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=[idx.tolist() for idx in index_lists], num_workers=workers,
            prefetch_factor=prefetch_batches if workers else None,
            pin_memory=torch.cuda.is_available(), persistent_workers=False)
        for x, y, video in loader:   # x: uint8 [b, T, H, W, C]
            yield x, y, video
    return fetch


def localise_rows(rows: list[dict], endpoint_url: str | None, region: str | None) -> list[dict]:
    """Manifest rows with `path` on this node: videos in S3 are fetched by content hash into the node cache; files of
    a local source are read where they are (the same machine, or a file system every node mounts)."""
    out = []
    for row in rows:
        if row["uri"].startswith("s3://"):
            bucket = row["uri"].split("/", 3)[2]
            videos = ArtifactStore(StoreSpec(root=f"s3://{bucket}", endpoint_url=endpoint_url, region=region))
            row = {**row, "path": str(videos.get_file(FileRef(uri=row["uri"], sha256=row["sha256"])))}
        else:
            row = {**row, "path": row["uri"]}
        out.append(row)
    return out
