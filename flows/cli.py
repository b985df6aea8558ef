"""The `vidopt` command.

    vidopt run [--profile demo] [key.sub=value ...]      run the pipeline flow (local Prefect, MLflow in the project dir)
    vidopt data sample --out DIR [--profile demo] [...]  write the labeled sample dataset as H.264 mp4 files
    vidopt bench decode DIR|--mix DIR [...]              clip-sampling throughput of decord vs PyAV, per kind of file
    vidopt bench ingest DIR [...]                        ingestion's per-file inspection: one PyAV pass vs two
    vidopt bench ladder [--project-dir .vidopt] [...]    latency / size / top-1 of teacher, student, pruned, int8
    vidopt bench export --stage-dir DIR                  each export target alone vs all at once on the pools
    vidopt bench rerun [--profile tiny]                  cold run vs unchanged re-run vs a quantize-only change
    vidopt bench seeds [--profile demo] [--seeds 0 1 2]  each rung's test top-1 per seed, its mean and spread
    vidopt bench int8-widths [...]                       int8 vs fp32 speed of 3x3 conv stacks at each layer width
    vidopt bench ops [FILE ...] [--project-dir .vidopt]  time per node (onnxruntime or --runtime openvino)
    vidopt bench train [--profile tiny] [--workers 1 2]  teacher training clips/s: vidopt vs a plain PyTorch loop
    vidopt evaluate --data DIR|s3://... [--model PATH]   top-1 with its interval, recall per class, confusion matrix
    vidopt predict PATH|DIR|s3://... [--model URI|PATH]  a label per video and per window, with clips/s
    vidopt config [--profile demo] [...]                 print the resolved config
    vidopt runs clean [--profile demo] [--older-than 2h] end the MLflow / Prefect runs of vidopt processes that died
    vidopt --debug <command> ...                         an error's traceback as well as its message
    vidopt listen [--profile demo] [...] [--once]        emit vidopt.data.arrived for new clips in data.source
    vidopt serve [--profile demo] [...]                  Prefect deployments of the pipeline: cron + new-data events
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from vidopt import __version__
from vidopt.config import PROFILE_DIR, ConfigError, PipelineConfig, load_config
from vidopt.errors import VidoptError
from vidopt.preflight import check_prefect_api, check_run, check_source
from vidopt.progress import progress_bar


def _add_config_args(parser: argparse.ArgumentParser, default_profile: str = "demo") -> None:
    known = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")))
    parser.add_argument("--profile", default=default_profile,
                        help=f"a profile in flows/configs/ ({known}; default {default_profile}) or a .yaml path")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. clips.frames=8")


def prefect_env(cfg: PipelineConfig) -> None:
    """Embedded default: Prefect's ephemeral server keeps its sqlite DB in the project dir. Must run before Prefect is
    imported; a user's own PREFECT_* settings (e.g. PREFECT_API_URL of a real server) win."""
    home = Path(os.environ.setdefault("PREFECT_HOME", str(Path(cfg.run.project_dir).resolve() / "prefect")))
    home.mkdir(parents=True, exist_ok=True)  # Prefect creates only the last level
    # Analytics on a fresh ephemeral server races the first migration ("database is locked").
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # A fresh project dir means sqlite migrations first: 6-16 s measured here, more on a busy machine; Prefect's 20 s
    # default then fails the very first `vidopt run` with "Timed out ... ephemeral Prefect API server".
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "vidopt")


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.profile, args.overrides)
    prefect_env(cfg)
    check_run(cfg)   # data, store, MLflow, Prefect: a mistake found in seconds, not halfway through the run
    from flows.pipeline import pipeline  # after prefect_env: Prefect reads its settings at import
    from flows.summary import print_summary

    hide_user_error_tracebacks()
    result = pipeline(cfg)
    print_summary(cfg, result)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from vidopt.sample_data import generate_dataset

    data = load_config(args.profile, args.overrides).data
    counts = generate_dataset(Path(args.out), data.sample, workers=data.probe_workers,
                              progress=lambda done, total: print(f"\rsample data: {done}/{total} videos",
                                                                 end="" if done < total else "\n", flush=True))
    print(json.dumps({"out": str(Path(args.out).resolve()), "videos_per_class": counts}, indent=2))
    return 0


BENCHES = ("decode", "ingest", "ladder", "export", "rerun", "seeds", "int8-widths", "ops", "train")


def run_bench(name: str, argv: list[str]) -> int:
    """Each benchmark parses its own arguments (argparse's REMAINDER would drop a leading --option)."""
    from vidopt.bench import decode, ingest, int8_widths, ladder, ops, train
    from flows import bench_rerun as rerun
    from flows import bench_seeds as seeds
    from workers import bench as export

    {"decode": decode.main, "ingest": ingest.main, "ladder": ladder.main, "export": export.main,
     "rerun": rerun.main, "seeds": seeds.main, "int8-widths": int8_widths.main, "ops": ops.main,
     "train": train.main}[name](argv)
    return 0


def cmd_listen(args: argparse.Namespace) -> int:
    cfg = load_config(args.profile, args.overrides)
    prefect_env(cfg)
    check_source(cfg)
    check_prefect_api()
    from flows.listen import listen  # after prefect_env: Prefect reads its settings at import

    try:
        listen(cfg, once=args.once)
    except KeyboardInterrupt:  # the way to stop it; batches not yet sent stay in the state file's outbox
        pass
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = load_config(args.profile, args.overrides)
    prefect_env(cfg)
    check_prefect_api()
    from flows.serve import serve  # after prefect_env: Prefect reads its settings at import

    serve(cfg)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from tasks.evaluate import format_report, run

    cfg = load_config(args.profile, args.overrides)
    report = run(cfg, args.data, args.model, args.out)
    print(format_report(report))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from tasks.predict import format_table, run

    cfg = load_config(args.profile, args.overrides)
    with progress_bar("predict", "videos") as progress:
        report = run(cfg, args.source, args.model, args.stride, args.eval_windows, args.workers, progress)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 1 if any(v["error"] for v in report["videos"]) else 0


def cmd_config(args: argparse.Namespace) -> int:
    print(load_config(args.profile, args.overrides).model_dump_json(indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidopt", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--version", action="version", version=f"vidopt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also VIDOPT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline")
    _add_config_args(run)
    run.set_defaults(func=cmd_run)

    data = sub.add_parser("data", help="data utilities").add_subparsers(dest="data_command", required=True)
    sample = data.add_parser("sample", help="write the labeled sample dataset")
    sample.add_argument("--out", required=True, help="output folder (<label>/<video>.mp4)")
    _add_config_args(sample)
    sample.set_defaults(func=cmd_sample)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    for name, what in (("decode", "decord vs PyAV clip sampling"),
                       ("ingest", "ingestion's per-file inspection: one PyAV pass vs two"),
                       ("ladder", "teacher -> int8 student, side by side"),
                       ("export", "export targets alone vs all together on the Ray pools"),
                       ("rerun", "cold run vs unchanged re-run vs quantize-only change (Prefect's cache)"),
                       ("seeds", "each rung's test top-1 per seed, mean and spread"),
                       ("int8-widths", "int8 vs fp32 speed of conv stacks by layer width"),
                       ("ops", "time per node of ONNX files on onnxruntime or OpenVINO, side by side"),
                       ("train", "teacher training clips/s: vidopt in-process / Ray Train vs a plain PyTorch loop")):
        one = bench.add_parser(name, help=what, add_help=False)
        one.add_argument("rest", nargs=argparse.REMAINDER)

    listen = sub.add_parser("listen", help="emit vidopt.data.arrived for new clips in data.source (until Ctrl-C)")
    _add_config_args(listen)
    listen.add_argument("--once", action="store_true", help="one pass: emit what is new now, then exit")
    listen.set_defaults(func=cmd_listen)

    serve = sub.add_parser("serve", help="serve the pipeline as Prefect deployments on a Prefect server (until Ctrl-C)")
    _add_config_args(serve)
    serve.set_defaults(func=cmd_serve)

    evaluate = sub.add_parser("evaluate", help="a model's top-1 (95%% interval), recall per class and confusion "
                                               "matrix on a labeled set, through its own runtime")
    evaluate.add_argument("--data", required=True, help="a folder or s3:// prefix of <label>/<file>")
    evaluate.add_argument("--model", type=Path, help="a stage's model folder or the CPU package (default: the "
                                                      "newest quantize model in the project)")
    evaluate.add_argument("--out", type=Path, help="where evaluation.json and confusion.png go")
    _add_config_args(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    predict = sub.add_parser("predict", help="classify videos: a label per video and per window, with clips/s")
    predict.add_argument("source", help="a video file, a folder of videos or an s3:// prefix")
    predict.add_argument("--model", help="models:/<name>@<alias> or models:/<name>/<version>, a CPU package or a "
                                         "model folder (default: models:/vidopt-cpu@champion, else the newest int8)")
    predict.add_argument("--stride", type=int, help="frames between window starts (default: one clip span)")
    predict.add_argument("--eval-windows", action="store_true",
                         help="the windows the pipeline's evaluation scores, instead of sliding ones")
    predict.add_argument("--workers", type=int, default=2, help="processes decoding videos in parallel")
    predict.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_config_args(predict)
    predict.set_defaults(func=cmd_predict)

    sub.add_parser("runs", help="`vidopt runs clean`: end the runs of vidopt processes that died (see --help)",
                   add_help=False)
    show = sub.add_parser("config", help="print the resolved config")
    _add_config_args(show)
    show.set_defaults(func=cmd_config)
    return parser


class RunNameFormatter(logging.Formatter):
    """`HH:MM:SS logger [task or flow run]: message`: Prefect's own lines ("Finished in state Completed()") say which
    task run they are about; vidopt's lines name their stage in the message."""

    def __init__(self):
        super().__init__("%(asctime)s %(name)s%(run)s: %(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        name = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
        record.run = f" [{name}]" if name else ""
        return super().format(record)


def configure_logging() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(RunNameFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call otherwise
    logging.getLogger("botocore").setLevel(logging.WARNING)  # "Found credentials in ..." for every client


def _exit_on_sigterm(signum: int, frame) -> None:
    """SIGTERM (`kill`, a scheduler, a container stop) ends the command as Ctrl-C would: finally blocks and atexit
    handlers run, so Prefect's temporary server, the local Ray and open MLflow runs are stopped, not orphaned (the
    default action kills the process with none of them run)."""
    raise SystemExit(128 + signum)


class HideUserErrorTracebacks(logging.Filter):
    """Log records about a VidoptError keep their message and lose the traceback: Prefect logs a failed task's and
    flow's exception with its traceback, but a mistake in the input is no bug, and the CLI's last line names it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], VidoptError) and not debugging():
            record.exc_info, record.exc_text = None, None
        return True


def hide_user_error_tracebacks() -> None:
    """On every handler there is now (Prefect configures its own at import, so call this after importing it)."""
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]
    for handler in {h for logger in loggers for h in getattr(logger, "handlers", [])}:
        if not any(isinstance(f, HideUserErrorTracebacks) for f in handler.filters):
            handler.addFilter(HideUserErrorTracebacks())


def debugging() -> bool:
    return os.environ.get("VIDOPT_DEBUG", "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--debug"]:
        os.environ["VIDOPT_DEBUG"] = "1"
        argv = argv[1:]
    if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    configure_logging()
    try:
        if len(argv) >= 2 and argv[0] == "bench" and argv[1] in BENCHES:
            return run_bench(argv[1], argv[2:])
        if argv[:1] == ["runs"]:   # `vidopt runs clean ...` parses its own arguments (flows/runs.py)
            from flows.runs import main as runs_main

            return runs_main(argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except VidoptError as err:
        # a mistake in the input or the environment: its message, one line per problem, and a non-zero exit
        if debugging():
            traceback.print_exc()
        print(f"vidopt: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1


if __name__ == "__main__":
    sys.exit(main())
