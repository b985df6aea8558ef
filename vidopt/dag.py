"""The stage order, written once: what each stage takes from the stages before it and what it hands on. The Prefect
flow, the standalone stage runner (`python -m tasks.<stage>`) and the test fixtures all walk this."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str                 # its module in tasks/, whose `run(cfg, **needs)` is the plain stage function
    needs: tuple[str, ...]    # earlier stages' outputs it takes, by the names they are given
    gives: str                # the name its output goes by
    each: str = ""            # in the flow, one task per item of this config list (its key's last part names the
    #                           task's argument), their results listed in order; as a plain function, one call


STAGES: tuple[Stage, ...] = (
    Stage("ingest", (), "dataset"),
    Stage("train_teacher", ("dataset",), "teacher"),
    Stage("distill", ("dataset", "teacher"), "student"),
    Stage("prune", ("dataset", "student", "teacher"), "pruned"),
    Stage("quantize", ("dataset", "pruned"), "int8"),
    Stage("export", ("dataset", "int8"), "targets", each="export.targets"),
    Stage("register", ("dataset", "teacher", "targets"), "registry"),
    Stage("crossval", ("dataset",), "crossval"),   # data.folds >= 2 only; after the shipped model's own chain
    Stage("report", ("dataset", "teacher", "student", "pruned", "int8", "targets", "registry", "crossval"), "report"),
)
LADDER = ("teacher", "student", "pruned", "int8")   # the models of the compression ladder, in order


def stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"no stage {name!r}; stages: {[s.name for s in STAGES]}")


def through(name: str) -> tuple[Stage, ...]:
    """The stages up to and including `name`, in order."""
    names = [s.name for s in STAGES]
    return STAGES[: names.index(stage(name).name) + 1]
