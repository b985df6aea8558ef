"""A cached stage is served only while its outputs hash as the stage sealed them: a truncated or deleted output makes
the stage run again (Prefect's cache key changes) and the log names the file; nothing needs deleting by hand."""
import logging
import os
from pathlib import Path

import pytest

from tasks import ingest, train_teacher
from tasks.train_teacher import train_teacher_task, work_dir
from vidopt.stages import seal_outputs


@pytest.fixture
def teacher(sample_dir, tiny_cfg):
    """A tiny teacher trained for one epoch and sealed as its Prefect task seals it -> (cfg, dataset, artifact)."""
    cfg = tiny_cfg(f"data.source={sample_dir}", "teacher.epochs=1")
    dataset = ingest.run(cfg)
    artifact = train_teacher.run(cfg, dataset)
    seal_outputs(work_dir(cfg, dataset), artifact)
    return cfg, dataset, artifact


def prefect_key(cfg, dataset) -> str:
    """The key Prefect computes before running the task (its cache_key_fn, called as Prefect calls it)."""
    return train_teacher_task.cache_key_fn(None, {"cfg": cfg, "dataset": dataset, "parent_run_id": "x"})


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def test_an_intact_stage_keeps_its_key(teacher):
    cfg, dataset, _ = teacher
    assert prefect_key(cfg, dataset) == prefect_key(cfg, dataset)


@pytest.mark.parametrize("damage, named", [
    (lambda model: truncate(model / "weights.safetensors"), "weights.safetensors: sha256 mismatch"),
    (lambda model: (model / "arch.json").write_text("{}"), "arch.json: sha256 mismatch"),
    (lambda model: __import__("shutil").rmtree(model), "not a published folder"),
])
def test_a_damaged_output_changes_the_key_names_the_file_and_the_stage_makes_it_again(teacher, damage, named,
                                                                                      caplog):
    cfg, dataset, artifact = teacher
    before = prefect_key(cfg, dataset)
    work = work_dir(cfg, dataset)
    damage(Path(work.store.local_path(artifact.uri)))
    with caplog.at_level(logging.WARNING, logger="vidopt.caching"):
        after = prefect_key(cfg, dataset)
    assert after != before, "the damaged result would have been served from Prefect's cache"
    assert named in caplog.text and "running the stage again" in caplog.text
    again = train_teacher.run(cfg, dataset)                  # what the task runs on the cache miss
    model_dir = work.store.get_dir(again.uri)                # verified against its marker
    assert (model_dir / "weights.safetensors").stat().st_size > 0
    seal_outputs(work, again)
    assert prefect_key(cfg, dataset) == prefect_key(cfg, dataset) == after   # sealed anew, and reused from now on


def test_the_plain_stage_function_also_remakes_a_damaged_model(teacher, caplog):
    """`python -m tasks.<stage>` and the test fixtures do not go through Prefect: run() checks the folder itself."""
    cfg, dataset, artifact = teacher
    truncate(Path(work_dir(cfg, dataset).store.local_path(artifact.uri)) / "weights.safetensors")
    with caplog.at_level(logging.WARNING, logger="vidopt.tasks"):
        again = train_teacher.run(cfg, dataset)
    assert "the finished model is damaged" in caplog.text and "weights.safetensors" in caplog.text
    assert work_dir(cfg, dataset).store.get_dir(again.uri).is_dir()
