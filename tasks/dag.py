"""The stages of vidopt/dag.py as plain functions, in order: what `python -m tasks.<stage>` and the test fixtures run
(each finished stage is found in the store and returned, so a re-run only does what is new)."""
from __future__ import annotations

import importlib
import json
from typing import Any

from vidopt.config import PipelineConfig
from vidopt.dag import through


def stage_function(name: str):
    return importlib.import_module(f"tasks.{name}").run


def run_until(cfg: PipelineConfig, last: str) -> dict[str, Any]:
    """Every stage up to `last` -> {output name: record}."""
    outputs: dict[str, Any] = {}
    for stage in through(last):
        outputs[stage.gives] = stage_function(stage.name)(cfg, **{n: outputs[n] for n in stage.needs})
    return outputs


def run_stage_standalone(name: str, argv: list[str] | None = None) -> None:
    """`python -m tasks.<stage> --profile tiny key.sub=value ...`: the stages up to this one, its record printed."""
    import argparse
    import logging

    from vidopt.config import load_config
    from vidopt.dag import stage
    from vidopt.errors import VidoptError

    parser = argparse.ArgumentParser(description=f"tasks.{name}: the stages up to {name}, as plain functions")
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    args = parser.parse_args(argv)
    # force: importing Prefect (the stage's @task) already put a WARNING-level handler on the root logger.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
    try:
        result = run_until(load_config(args.profile, args.overrides), name)[stage(name).gives]
    except VidoptError as err:   # a mistake in the input: its message, not a traceback
        raise SystemExit(f"tasks.{name}: error: {err}") from None
    records = result if isinstance(result, list) else [result]
    print(json.dumps([r if isinstance(r, dict) else r.model_dump(mode="json") for r in records], indent=2))
