"""[Ray] Where training and inference jobs run (vidopt/train_jobs.py): in this process when there is nothing to spread
(one worker, no cluster, a local store, no GPU asked for), else as a Ray Train TorchTrainer: `train.workers` workers,
each on the GPU pool where the cluster has one (DDP over NCCL) or on CPUs (DDP over gloo), checkpoints in the
artifact store (RunConfig.storage_path), so a lost worker or node resumes from the last epoch.

    python -m workers.train      # the tiny profile's teacher, in this process and on a local Ray (own project dirs)
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

from vidopt.checkpoint import CheckpointError, save_checkpoint, verified_checkpoint
from vidopt.config import RayConfig, TrainConfig
from vidopt.store import ArtifactStore, FileRef, StoreSpec
from vidopt.train_jobs import LogitsJob, TrainJob, TrainResult, result_uri, run_logits_job, run_train_job
from vidopt.training import FIT_STATE_KEYS, EpochLogger

log = logging.getLogger("vidopt.train")
STATE_FILE = "state.pt"   # inside each Ray Train checkpoint folder


class TrainingError(RuntimeError):
    """A training run that cannot start (no pool for it) or that failed past its retries; the message says which."""


def use_ray(train: TrainConfig, ray_cfg: RayConfig, store: StoreSpec) -> bool:
    if train.launcher != "auto":
        return train.launcher == "ray"
    local_store = "://" not in store.root
    return train.workers > 1 or bool(ray_cfg.address) or not local_store or train.device == "gpu"


def run_training(job: TrainJob, train: TrainConfig, ray_cfg: RayConfig,
                 logger: EpochLogger | None = None) -> TrainResult:
    """Train `job` where train / ray say; a job whose result is already in the store is not trained again (a
    resumed stage replays its finished jobs)."""
    store = ArtifactStore(job.store)
    if store.has(result_uri(job)):
        done = TrainResult.model_validate_json(store.read_text(result_uri(job)))
        if store.has(done.weights.uri):
            log.info("%s: %s holds the finished result; not training again", job.stage, result_uri(job))
            return done
    store.write_text(f"{job.output}.job.json", job.model_dump_json(indent=2))   # what was trained, for the record
    if not use_ray(train, ray_cfg, job.store):
        return run_train_job(job, logger=logger, on_driver=True)
    result = _ray_train(job, train, ray_cfg)
    if logger is not None:   # the workers' epochs, logged here: the workers hold no MLflow run
        for row in result.history:
            for name in ("loss", "score", "seconds"):
                metric = job.selection.name if name == "score" else ("epoch_seconds" if name == "seconds" else name)
                logger.log(f"{job.stage}.{metric}", row[name], step=row["epoch"])
    return result


def run_logits(job: LogitsJob, train: TrainConfig, ray_cfg: RayConfig) -> FileRef:
    """A model's logits over a clip set: here, or as one Ray task on the pool training uses."""
    store = ArtifactStore(job.store)
    if store.has(job.output):
        return store.ref(job.output)
    if not use_ray(train, ray_cfg, job.store):
        return run_logits_job(job)
    import ray

    from workers.pools import connect

    available = connect(ray_cfg)
    gpu = _train_on_gpu(train, available, workers=1)
    job = job.model_copy(update={"placement": job.placement.model_copy(update={"device": "gpu" if gpu else "cpu"})})
    resources = {"num_gpus": 1, "num_cpus": 0} if gpu else {"num_cpus": 1}
    ref = ray.remote(**resources)(run_logits_job).remote(job)
    try:
        return ray.get(ref, timeout=ray_cfg.job_timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        raise TrainingError(f"logits of {job.clips.uri}: no result after {ray_cfg.job_timeout_s:.0f} s "
                            "(ray.job_timeout_s; is the pool busy?)") from None


def _train_on_gpu(train: TrainConfig, available: dict[str, float], workers: int) -> bool:
    gpus = available.get("GPU", 0)
    if train.device == "cpu":
        return False
    if gpus >= workers:
        return True
    if train.device == "gpu":
        raise TrainingError(f"train.device=gpu: the Ray cluster offers {gpus:g} GPU(s), train.workers={workers} "
                            "needs one each; add GPU nodes, lower train.workers, or set train.device=auto")
    return False


def _ray_train(job: TrainJob, train: TrainConfig, ray_cfg: RayConfig) -> TrainResult:
    """[Ray] a TorchTrainer over `train.workers` workers; the result is what rank 0 put in the store."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from workers.pools import connect

    # Ray Train's controller takes the workers' reports at each health check (every 2 s by default) and a worker
    # waits for its report to be taken: 40 short epochs took 106 s so, 45 s at 0.5 s (the driver's value reaches
    # the controller).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    available = connect(ray_cfg)
    gpu = _train_on_gpu(train, available, train.workers)
    cpus = train.cpus_per_worker or (0 if gpu else max(1, int(available.get("CPU", 1)) // train.workers))
    if not gpu and available.get("CPU", 0) < cpus * train.workers:
        raise TrainingError(f"train: {train.workers} CPU workers of {cpus} CPU(s) each need "
                            f"{cpus * train.workers} CPUs; the Ray cluster offers {available.get('CPU', 0):g}")
    placement = job.placement.model_copy(update={"device": "gpu" if gpu else "cpu", "threads": cpus or None})
    job = job.model_copy(update={"placement": placement})
    backend = "nccl" if gpu and _pool_has_cuda(ray_cfg) else "gloo"
    storage_path, filesystem = _ray_storage(job.run_dir, job.store)
    log.info("%s: Ray Train, %d %s worker(s), DDP over %s, checkpoints in %s/%s", job.stage, train.workers,
             "GPU" if gpu else f"{cpus}-CPU", backend, job.run_dir, job.checkpoint_name)
    trainer = TorchTrainer(
        _train_loop_per_worker, train_loop_config={"job": job.model_dump(mode="json")},
        # [Ray] one GPU per worker on the GPU pool, else CPUs
        scaling_config=ScalingConfig(num_workers=train.workers, use_gpu=gpu,
                                     resources_per_worker={"GPU": 1, "CPU": cpus} if gpu else {"CPU": cpus}),
        torch_config=TorchConfig(backend=backend),
        run_config=RunConfig(name=job.checkpoint_name, storage_path=storage_path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    outcome = trainer.fit()
    if outcome.error is not None:
        raise TrainingError(f"{job.stage}: training failed after {train.max_failures} restart(s): "
                            f"{outcome.error}") from outcome.error
    store = ArtifactStore(job.store)
    result = TrainResult.model_validate_json(store.read_text(result_uri(job)))
    if result.note:
        log.warning("%s: %s", job.stage, result.note)
    return result


def _train_loop_per_worker(config: dict) -> None:
    """[Ray] what each Ray Train worker runs: the plain job, with Ray Train's checkpoints."""
    import ray.train

    context = ray.train.get_context()
    job = TrainJob.model_validate(config["job"])
    run_train_job(job, RayCheckpoint(context.get_world_rank()), context.get_world_rank(), context.get_world_size())


class RayCheckpoint:
    """[Ray] fit's state in Ray Train checkpoints: every rank reports each epoch, rank 0 with the state."""

    def __init__(self, rank: int):
        self.rank = rank

    def load(self) -> dict | None:
        """The latest checkpoint's state; one that fails verification is skipped with a warning for the one Ray Train
        kept before it, else None (train from scratch). Ray's folders are left as they are: it prunes them itself."""
        import ray.train

        latest = ray.train.get_checkpoint()
        if latest is None:
            return None
        for checkpoint in _newest_first(latest):
            try:
                with checkpoint.as_directory() as folder:
                    state = verified_checkpoint(Path(folder) / STATE_FILE, FIT_STATE_KEYS)
            except CheckpointError as err:
                log.warning("Ray Train checkpoint %s/%s: %s; skipped", checkpoint.path, STATE_FILE, err)
                continue
            if checkpoint is not latest:
                log.warning("Ray Train checkpoint: resuming from the one before, %s", checkpoint.path)
            return state
        log.warning("Ray Train checkpoints beside %s: none usable; training starts from scratch", latest.path)
        return None

    def save(self, state: dict, metrics: dict[str, float]) -> None:
        import ray.train

        if self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="vidopt-ckpt-") as folder:
            save_checkpoint(Path(folder) / STATE_FILE, state)   # state.pt and its state.pt.sha256
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _newest_first(latest) -> list:
    """[Ray] `latest`, then the older checkpoint_<timestamp> folders Ray Train keeps beside it (CheckpointConfig's
    num_to_keep), newest first; their names sort by time."""
    import posixpath

    import pyarrow.fs
    import ray.train

    parent, name = posixpath.split(latest.path.rstrip("/"))
    try:
        entries = latest.filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    except OSError as err:
        log.warning("Ray Train checkpoints: cannot list %s (%s); only the latest is tried", parent, err)
        entries = []
    older = sorted((e.path for e in entries if e.type == pyarrow.fs.FileType.Directory
                    and e.base_name.startswith("checkpoint_") and e.base_name < name), reverse=True)
    return [latest, *(ray.train.Checkpoint(path, filesystem=latest.filesystem) for path in older)]


def _pool_has_cuda(ray_cfg: RayConfig) -> bool:
    """[Ray] whether the GPU pool's nodes really have CUDA (a declared GPU may be emulated): NCCL needs it."""
    import ray

    probe = ray.remote(num_gpus=1, num_cpus=0)(torch.cuda.is_available).remote()
    try:
        return bool(ray.get(probe, timeout=ray_cfg.job_timeout_s))
    except ray.exceptions.GetTimeoutError:
        ray.cancel(probe, force=True)
        raise TrainingError(f"the GPU pool did not answer in {ray_cfg.job_timeout_s:.0f} s (ray.job_timeout_s)") \
            from None


def _ray_storage(run_dir: str, store: StoreSpec):
    """(storage_path, filesystem) for Ray Train: the job's folder in the store; S3 through pyarrow, with the store's
    endpoint where one is set (MinIO), else pyarrow's own AWS configuration (AWS_ENDPOINT_URL, profiles)."""
    if not run_dir.startswith("s3://") or not (store.endpoint_url or store.region):
        return run_dir, None
    import pyarrow.fs

    options = {"endpoint_override": store.endpoint_url} if store.endpoint_url else {}
    if store.region:
        options["region"] = store.region
    return run_dir.removeprefix("s3://"), pyarrow.fs.S3FileSystem(**options)


if __name__ == "__main__":
    from tasks.dag import run_until
    from vidopt.config import load_config

    logging.basicConfig(level=logging.INFO)
    for launcher in ("local", "ray"):
        cfg = load_config("tiny", [f"train.launcher={launcher}", f"run.project_dir=.vidopt-tiny-{launcher}"])
        print(launcher, run_until(cfg, "train_teacher")["teacher"].notes["trained_on"])
