"""Training throughput of the profile's teacher: vidopt's training (in this process, or Ray Train over W workers)
against the plain single-process PyTorch loop a user would write for the same model and the same clips.

    vidopt bench train [--profile tiny|demo|gpu] [--workers 1 2] [--device cpu|gpu|auto] [--epochs 3]
                       [--project-dir DIR] [--out DIR] [key.sub=value ...]

Each row trains the teacher from the same fresh weights (run.seed) for --epochs epochs and times the epochs after the
first (epoch 1 pays the warm-up: the allocator, first kernel launches and oneDNN primitives, the loader's first
batches); with --epochs 1 that one epoch is timed, and the report says so. Per row: clips/s of the training passes
(scoring excluded; clips of all ranks), the share of that time the loop waited for its next batch and, on CUDA, the
share the GPU was computing (both rank 0's), and clips/s as a share of the plain loop's. The project's bar, on a GPU
with the gpu profile: >= 80% of the plain loop's clips/s, data wait < 10% of step time.

What is the same in every row: the train split's manifest rows, the clip config, ClipDataset's uint8 clips (decoded
once into memory where they fit clips.memory_cache_mb, else by clips.loader_workers processes), normalisation on the
training device, channels-last conv weights, the mixed precision pick_precision chooses, AdamW, cross-entropy, the
global batch. What only vidopt does: the one-cycle schedule, a per-step loss.item(), scoring and a checkpoint after
every epoch (not timed), DDP across workers, and teacher.augment where the profile turns it on.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from pathlib import Path

import torch
from torch import nn

from vidopt.bench import cpu_model, write_report
from vidopt.config import PipelineConfig, load_config
from vidopt.data import ClipDataset, FrameStore, normalise_clips
from vidopt.models import TeacherArch, build_model
from vidopt.stages import open_store, split_rows
from vidopt.store import FileRef
from vidopt.shards import global_batches, shard
from vidopt.train_jobs import (ModelSpec, Objective, Placement, TrainJob, TrainResult, VideoClips, describe_device,
                               pick_device, pick_precision)

log = logging.getLogger("vidopt.bench.train")
DEFAULTS = {"profile": "tiny", "workers": [1], "epochs": 3}   # sized for a CPU sanity run: ~20 s on 2 idle cores
STAGE = "bench_train"
PLAIN, IN_PROCESS, RAY_TRAIN = "plain PyTorch", "vidopt in-process", "vidopt Ray Train"


# --- what is measured ------------------------------------------------------------------------------------------------

def clips_per_epoch(n: int, batch_size: int, world: int) -> int:
    """Clips all ranks together train on per epoch, exactly: every global batch but one smaller than the world, which
    ShardedBatches skips on every rank (shards.shard). Rank 0's `clips` times the world would miscount an uneven
    last batch (ranks' shares differ by one)."""
    return sum(len(b) for b in global_batches(n, batch_size, seed=0) if shard(b, 0, world) is not None)


def timed_epochs(history: list[dict]) -> list[dict]:
    """The steady state: every epoch after the first, or the only one."""
    return history[1:] if len(history) > 1 else history


def summarise(history: list[dict], clips_each: list[int]) -> dict:
    """Throughput over the timed epochs of a history ({train_seconds, data_seconds, gpu_busy?} per epoch) in which
    epoch i trained clips_each[i] clips over all ranks."""
    timed = timed_epochs(history)
    clips = sum(clips_each[e["epoch"]] for e in timed)
    seconds = sum(e["train_seconds"] for e in timed)
    busy = [e.get("gpu_busy") for e in timed]
    return {"epochs_timed": [e["epoch"] + 1 for e in timed], "clips": clips, "seconds": seconds,
            "clips_per_s": clips / seconds, "data_wait_share": sum(e["data_seconds"] for e in timed) / seconds,
            "gpu_busy": None if None in busy else sum(b * e["train_seconds"] for b, e in zip(busy, timed)) / seconds}


# --- vidopt: the teacher's TrainJob, as tasks/train_teacher.py builds it ---------------------------------------------

def teacher_arch(cfg: PipelineConfig, classes: list[str]) -> TeacherArch:
    t = cfg.teacher
    return TeacherArch(arch=t.arch, width=t.width, frame_differences=t.frame_differences, num_classes=len(classes))


def teacher_job(cfg: PipelineConfig, dataset, run_dir: str, epochs: int) -> TrainJob:
    """train_teacher's job, except: fresh weights from run.seed (teacher.init ignored: speed does not depend on weight
    values), `epochs` epochs with no early stop, and its own run folder (run_training returns a finished result
    without training)."""
    from tasks.common import TrainingReads, placement, selection

    reads, t = TrainingReads.of(cfg), cfg.teacher
    return TrainJob(
        stage=STAGE, store=open_store(cfg.run).spec, run_dir=run_dir, output=f"{run_dir}/trained.safetensors",
        model=ModelSpec(arch=teacher_arch(cfg, dataset.classes).model_dump(mode="json")),
        data=VideoClips(manifest=FileRef(uri=dataset.manifest_uri, sha256=dataset.manifest_sha256),
                        classes=dataset.classes, clips=cfg.clips, source_endpoint_url=dataset.source_endpoint_url,
                        source_region=dataset.source_region),
        objective=Objective(loss="cross_entropy"), selection=selection(reads, dataset, STAGE), augment=t.augment,
        epochs=epochs, lr=t.lr, weight_decay=t.weight_decay, patience=epochs,
        batch_size=cfg.clips.batch_size, seed=cfg.run.seed, placement=placement(reads, cpu_precision=t.precision))


def vidopt_row(cfg: PipelineConfig, dataset, workers: int, epochs: int, n_train: int) -> dict:
    """One vidopt run at `workers` workers through workers/train.py, as the pipeline runs it; its run folder is
    deleted afterwards (the numbers are in the report)."""
    from workers.train import run_training, use_ray

    train = cfg.train.model_copy(update={"workers": workers, **({"launcher": "ray"} if workers > 1 else {})})
    store = open_store(cfg.run)
    run_dir = store.uri("bench", "train", "runs", f"{time.strftime('%Y%m%d-%H%M%S')}-w{workers}-{train.device}")
    job = teacher_job(cfg, dataset, run_dir, epochs)
    launcher = RAY_TRAIN if use_ray(train, cfg.ray, job.store) else IN_PROCESS
    log.info("bench train: %s, %d worker(s), device %s, %d epochs, run folder %s", launcher, workers, train.device,
             epochs, run_dir)
    started = time.monotonic()
    result: TrainResult = run_training(job, train, cfg.ray)
    wall = time.monotonic() - started
    store.delete(run_dir)
    each = [clips_per_epoch(n_train, job.batch_size, result.world_size)] * len(result.history)
    return {"launcher": launcher, "workers": workers, "world_size": result.world_size, "device": result.device,
            "precision": result.precision, **summarise(result.history, each),
            "rank0_clips": [e["clips"] for e in result.history], "wall_seconds": wall, "note": result.note,
            "history": result.history}


# --- the baseline: the plain loop a user would write -----------------------------------------------------------------

def plain_pytorch(rows: list[dict], classes: list[str], cfg: PipelineConfig, placement: Placement,
                  epochs: int) -> dict:
    """One process, one device: a DataLoader over the same clips, AdamW, forward / backward / step, no schedule, no
    per-step sync (the loss is summed on the device), under the same autocast and channels-last weights."""
    clips, t = cfg.clips, cfg.teacher
    device, note = pick_device(placement.device)
    precision = pick_precision(placement, device)
    torch.manual_seed(cfg.run.seed)
    model = build_model(teacher_arch(cfg, classes)).to(device, memory_format=torch.channels_last_3d)
    store = FrameStore.decode_if_fits(rows, clips)   # before the clock, as vidopt's loader does
    dataset = ClipDataset(rows, classes, clips, train=True, seed=cfg.run.seed, normalise=False, store=store)
    workers = 0 if store is not None else clips.loader_workers
    loader = torch.utils.data.DataLoader(dataset, batch_size=clips.batch_size, shuffle=True, num_workers=workers,
                                         prefetch_factor=placement.prefetch_batches if workers else None,
                                         pin_memory=device.type == "cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    history = []
    for epoch in range(epochs):
        dataset.epoch, total, seen, waited = epoch, torch.zeros((), device=device), 0, 0.0
        model.train()
        started = asked = time.monotonic()
        for x, y, _ in loader:                       # x: uint8 [b, T, H, W, C]
            waited += time.monotonic() - asked
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(normalise_clips(x))   # [b, T, H, W, C] -> [b, C, T, H, W], channels-last strides
            loss = nn.functional.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total, seen = total + loss.detach(), seen + len(y)
            asked = time.monotonic()
        loss_mean = float(total) / max(1, len(loader))   # float(): waits for the device, inside the clock
        history.append({"epoch": epoch, "loss": loss_mean, "clips": seen, "train_seconds": time.monotonic() - started,
                        "data_seconds": waited})
        log.info("bench train: plain PyTorch epoch %d/%d loss %.4f (%.1f s)", epoch + 1, epochs, loss_mean,
                 history[-1]["train_seconds"])
    return {"launcher": PLAIN, "workers": 1, "world_size": 1, "device": describe_device(device), "precision": precision,
            **summarise(history, [e["clips"] for e in history]), "note": note, "history": history,
            "loader": "decoded once into memory" if store is not None else f"{workers} decoding processes"}


# --- report ----------------------------------------------------------------------------------------------------------

def machine() -> dict:
    import ray

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available()
            else None, "torch": torch.__version__, "ray": ray.__version__}


def markdown(report: dict) -> str:
    s = report["setup"]
    one = " (--epochs 1: that epoch, warm-up included)" if s["epochs"] == 1 else \
        f" (epochs 2-{s['epochs']}: the first is warm-up)" if s["epochs"] > 2 else " (epoch 2: the first is warm-up)"
    lines = [f"## Teacher training throughput: {s['profile']} profile, {s['teacher']['arch']} width "
             f"{s['teacher']['width']:g}", "", f"`{report['command']}`", "",
             f"{s['date']}; {s['machine']['cpu']}, {s['machine']['cores']} cores"
             + (f", {s['machine']['gpu']}" if s["machine"]["gpu"] else ", no GPU")
             + f"; torch {s['machine']['torch']}, ray {s['machine']['ray']}",
             f"clips {'x'.join(map(str, s['clip_shape']))} (T x H x W), global batch {s['batch_size']}, "
             f"{s['train_videos']} train videos, loader: {s['loader']}; timed{one}", "",
             "| launcher | workers | device | precision | clips | seconds | clips/s | data wait | GPU busy "
             "| vs plain |", "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        busy = "n/a" if r["gpu_busy"] is None else f"{r['gpu_busy']:.0%}"
        lines.append(f"| {r['launcher']} | {r['world_size']} | {r['device']} | {r['precision']} | {r['clips']} | "
                     f"{r['seconds']:.2f} | {r['clips_per_s']:.1f} | {r['data_wait_share']:.1%} | {busy} | "
                     f"**{r['share_of_plain']:.0%}** |")
    notes = [f"- {r['launcher']} x{r['workers']}: {r['note']}" for r in report["rows"] if r["note"]]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="vidopt bench train", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default=DEFAULTS["profile"], help="tiny, demo, gpu, or a .yaml path")
    parser.add_argument("--workers", type=int, nargs="+", default=DEFAULTS["workers"],
                        help="vidopt rows: Ray Train above 1 worker; at 1, train.launcher decides")
    parser.add_argument("--device", choices=["cpu", "gpu", "auto"], help="train.device (default: the profile's)")
    parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="per row; the first is not timed")
    parser.add_argument("--project-dir", help="run.project_dir: the ingested data, the runs' scratch folders")
    parser.add_argument("--out", type=Path, help="writes train.json and train.md (default <project dir>/bench/train)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = parser.parse_args(argv)
    if args.epochs < 1 or min(args.workers) < 1:
        parser.error("--epochs and --workers must be at least 1")
    overrides = [*args.overrides, *([f"run.project_dir={args.project_dir}"] if args.project_dir else []),
                 *([f"train.device={args.device}"] if args.device else [])]
    cfg = load_config(args.profile, overrides)

    import ray  # [Ray] a local Ray the vidopt rows start is stopped at the end

    ray_was_up = ray.is_initialized()
    from tasks.common import TrainingReads, placement
    from tasks.dag import run_until

    dataset = run_until(cfg, "ingest")["dataset"]   # cached in the project dir; sample data written if missing
    rows = split_rows(dataset, "train", open_store(cfg.run))
    place = placement(TrainingReads.of(cfg), cpu_precision=cfg.teacher.precision)
    log.info("bench train: plain PyTorch, %d train videos, %d epochs", len(rows), args.epochs)
    try:
        table = [plain_pytorch(rows, dataset.classes, cfg, place, args.epochs)]
        table += [vidopt_row(cfg, dataset, w, args.epochs, len(rows)) for w in args.workers]
    finally:
        if not ray_was_up and ray.is_initialized():
            ray.shutdown()
    for row in table:
        row["share_of_plain"] = row["clips_per_s"] / table[0]["clips_per_s"]

    c = cfg.clips
    setup = {"profile": args.profile, "epochs": args.epochs, "device": cfg.train.device, "workers": args.workers,
             "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "clip_shape": [c.frames, c.height, c.width],
             "batch_size": c.batch_size, "train_videos": len(rows),
             "loader": table[0]["loader"],   # the same rule (FrameStore.decode_if_fits) in every row
             "teacher": teacher_arch(cfg, dataset.classes).model_dump(), "augment": cfg.teacher.augment,
             "clips_counted": "all ranks: every global batch but one smaller than the world (clips_per_epoch)"}
    report = {"command": shlex.join(["vidopt", "bench", "train", *argv]), "setup": setup, "rows": table}
    out = args.out or Path(cfg.run.project_dir) / "bench" / "train"
    write_report(out, "train", report, markdown(report))
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    main()
