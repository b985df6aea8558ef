"""Benchmark of the pools' concurrency: each export target alone, then all of them at once, on the same jobs.

    vidopt bench export --stage-dir .vidopt/stages/export/<key> [--out DIR]

The export stage is worth its pools only if running every target together costs little more than the slowest one
alone; the project's bar is <= 1.3x. Reads the jobs.json an export stage wrote; each run writes into a fresh folder.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vidopt.artifacts import ExportJob
from vidopt.config import RayConfig
from workers.pools import run_jobs

BAR = 1.3


def timed(jobs: list[ExportJob], cfg: RayConfig) -> tuple[float, list]:
    started = time.monotonic()
    results = run_jobs(jobs, cfg)
    return time.monotonic() - started, results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="vidopt bench export", description=__doc__.split("\n")[0])
    parser.add_argument("--stage-dir", type=Path, required=True, help="an export stage dir holding jobs.json")
    parser.add_argument("--out", type=Path, default=Path(".vidopt/bench/export"))
    parser.add_argument("--timeout", type=float, default=1800, help="per-job deadline, seconds")
    args = parser.parse_args(argv)
    jobs = [ExportJob.model_validate(j) for j in json.loads((args.stage_dir / "jobs.json").read_text())]
    cfg = RayConfig(job_timeout_s=args.timeout)

    def fresh(job: ExportJob, run: str) -> ExportJob:
        return job.model_copy(update={"out_dir": str(args.out / run / job.target)})

    alone = {}
    for job in jobs:
        seconds, [result] = timed([fresh(job, "alone")], cfg)
        alone[job.target] = {"seconds": seconds, "status": result.status}
        print(f"{job.target:<5} alone: {seconds:7.1f} s ({result.status})", flush=True)
    together, results = timed([fresh(j, "together") for j in jobs], cfg)
    slowest = max(v["seconds"] for v in alone.values())
    report = {"alone": alone, "together_seconds": together, "slowest_alone_seconds": slowest,
              "ratio": together / slowest, "bar": BAR, "meets_bar": together / slowest <= BAR,
              "together_status": {r.target: r.status for r in results}}
    print(f"all together: {together:7.1f} s; slowest alone {slowest:.1f} s; ratio {together / slowest:.2f} "
          f"(bar <= {BAR})")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "export_bench.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
