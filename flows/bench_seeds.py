"""How the compression ladder holds across seeds: the pipeline's model stages once per seed, then each rung's test
top-1 per seed, its mean and spread, and int8 against the teacher.

    vidopt bench seeds [--profile demo] [--seeds 0 1 2] [key.sub=value ...]

Each seed's stages are cached in the project's store like any run's (the seed is part of every stage key), so a second
call only prints.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

from tasks.dag import run_until
from vidopt.bench import cpu_model, print_report
from vidopt.config import load_config
from vidopt.dag import LADDER


def run(profile: str, seeds: list[int], overrides: list[str]) -> dict:
    per_seed = {}
    for seed in seeds:
        cfg = load_config(profile, [*overrides, f"run.seed={seed}"])
        ladder = run_until(cfg, "quantize")
        per_seed[seed] = {rung: ladder[rung].metrics.get("test_top1_clip") for rung in LADDER}
        per_seed[seed]["int8_notes"] = ladder["int8"].notes.get("quantization", "")
    summary = {}
    for rung in LADDER:
        values = [per_seed[s][rung] for s in seeds if per_seed[s][rung] is not None]
        summary[rung] = {"mean": statistics.fmean(values) if values else None,
                         "stdev": statistics.stdev(values) if len(values) > 1 else 0.0}
    gap = (summary["teacher"]["mean"] - summary["int8"]["mean"]) if summary["int8"]["mean"] is not None else None
    return {"profile": profile, "seeds": seeds, "overrides": overrides, "per_seed": per_seed, "summary": summary,
            "int8_below_teacher_points": None if gap is None else 100 * gap, "cpu": cpu_model(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}


def format_table(report: dict) -> str:
    seeds = report["seeds"]
    lines = [f"`vidopt bench seeds --profile {report['profile']} --seeds {' '.join(map(str, seeds))}"
             f"{' ' + ' '.join(report['overrides']) if report['overrides'] else ''}`",
             f"{report['date']}, {report['cpu']}", "",
             "| rung | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | spread (sd) |",
             "|---|" + "---:|" * (len(seeds) + 2)]
    for rung in LADDER:
        cells = [f"{100 * report['per_seed'][s][rung]:.1f}" if report["per_seed"][s][rung] is not None else "-"
                 for s in seeds]
        stat = report["summary"][rung]
        mean = "-" if stat["mean"] is None else f"{100 * stat['mean']:.1f}"
        lines.append(f"| {rung} | " + " | ".join(cells) + f" | {mean} | {100 * stat['stdev']:.1f} |")
    gap = report["int8_below_teacher_points"]
    if gap is not None:
        side = f"{gap:.1f} points below" if gap > 0 else f"{-gap:.1f} points above"
        lines += ["", f"mean int8 is {side} the mean teacher ({'within' if gap <= 2 + 1e-9 else 'NOT within'} "
                      "2 points below)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="vidopt bench seeds", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]   # anywhere, also after --seeds 0 1 2
    args = parser.parse_args([a for a in argv if a not in overrides])
    report = run(args.profile, args.seeds, overrides)
    return print_report(report, format_table(report), args.json)


if __name__ == "__main__":
    main()
