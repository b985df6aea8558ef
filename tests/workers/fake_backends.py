"""Back-ends with scripted behaviour, to test the pools' timeouts, restarts and concurrency with a real Ray. The
script is `behaviour.json` in the job's model folder: {"behaviour", "seconds", "attempts_file"}."""
import json
import os
import time
from pathlib import Path

from vidopt.artifacts import LocalExportJob, TargetResult


def run_target(job: LocalExportJob) -> TargetResult:
    script = json.loads((Path(job.model_dir) / "behaviour.json").read_text())
    behaviour = script.get("behaviour", "ok")
    marker = Path(script["attempts_file"])
    marker.parent.mkdir(parents=True, exist_ok=True)
    attempts = int(marker.read_text()) + 1 if marker.exists() else 1
    marker.write_text(str(attempts))
    if behaviour == "hang":
        time.sleep(3600)
    if behaviour == "crash_once" and attempts == 1:
        os._exit(1)  # the worker process dies mid-job, as on a segfault or OOM kill
    if behaviour == "raise":
        raise ValueError(f"{job.target}: model_dir has no arch.json")
    time.sleep(float(script.get("seconds", 0)))
    return TargetResult(target=job.target, status="ok", runtime=f"fake pid {os.getpid()}",
                        extra={"attempts": attempts, "gpu_ids": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                               "nice": os.nice(0)})
