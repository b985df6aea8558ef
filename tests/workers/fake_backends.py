"""Back-ends with scripted behaviour, to test the pools' timeouts, restarts and concurrency with a real Ray."""
import os
import time
from pathlib import Path

from vidopt.artifacts import ExportJob, TargetResult


def run_target(job: ExportJob) -> TargetResult:
    behaviour = job.options.get("behaviour", "ok")
    marker = Path(job.out_dir) / f"{job.target}.attempts"
    marker.parent.mkdir(parents=True, exist_ok=True)
    attempts = int(marker.read_text()) + 1 if marker.exists() else 1
    marker.write_text(str(attempts))
    if behaviour == "hang":
        time.sleep(3600)
    if behaviour == "crash_once" and attempts == 1:
        os._exit(1)  # the worker process dies mid-job, as on a segfault or OOM kill
    if behaviour == "raise":
        raise ValueError(f"{job.target}: model_dir has no arch.json")
    time.sleep(float(job.options.get("seconds", 0)))
    return TargetResult(target=job.target, status="ok", runtime=f"fake pid {os.getpid()}",
                        extra={"attempts": attempts, "gpu_ids": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                               "nice": os.nice(0)})
