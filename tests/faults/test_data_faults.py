"""Data mistakes are refused or quarantined with their reason, never papered over: a mistyped source, one class, a
class missing from a split, labels of any text, a still image, a copied clip, a damaged probe cache."""
import json
import logging
import shutil
from pathlib import Path

import pytest

from flows.cli import main
from tasks import ingest
from vidopt.ingestion import IngestError
from vidopt.storage import read_jsonl


def copy_classes(sample_dir: Path, dest: Path, names: dict[str, str]) -> Path:
    """The sample's classes (keys of `names`) copied under new label folder names (values)."""
    for old, new in names.items():
        shutil.copytree(sample_dir / old, dest / new)
    return dest


def test_a_source_that_does_not_exist_is_an_error_and_nothing_is_written_there(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(["run", "--profile", "tiny", f"run.project_dir={tmp_path / 'project'}", "data.source=./typo_dir"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "data.source ./typo_dir does not exist" in err
    assert not (tmp_path / "typo_dir").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]   # nothing outside the project dir


def test_sample_data_fills_only_the_projects_own_bucket(tiny_cfg, monkeypatch):
    cfg = tiny_cfg()
    assert cfg.is_project_bucket() and Path(cfg.data.source) == Path(cfg.run.project_dir) / "bucket"
    calls = []
    monkeypatch.setattr(ingest, "generate_dataset", lambda out, *a, **k: calls.append(out))
    ingest._fill_with_samples_if_missing(cfg)
    assert calls == [Path(cfg.data.source)]
    elsewhere = tiny_cfg(f"data.source={Path(cfg.run.project_dir).parent / 'mine'}")
    ingest._fill_with_samples_if_missing(elsewhere)
    assert len(calls) == 1   # a folder the user named is never filled


def test_one_class_is_an_error_naming_it_and_its_counts(sample_dir, tmp_path, tiny_cfg):
    source = copy_classes(sample_dir, tmp_path / "src", {"move_left": "only_one"})
    with pytest.raises(IngestError, match=r"holds 1 class \('only_one': \d+/\d+/\d+ .*at least two"):
        ingest.run(tiny_cfg(f"data.source={source}"))


def test_a_class_missing_from_a_split_is_an_error_naming_it(sample_dir, tmp_path, tiny_cfg):
    source = copy_classes(sample_dir, tmp_path / "src", {"move_left": "left", "move_right": "right"})
    for path in sorted((source / "right").glob("*.mp4"))[2:]:
        path.unlink()   # two videos: not enough for train, val and test
    with pytest.raises(IngestError, match=r"'right' has no val or test videos .*'right': 2/0/0"):
        ingest.run(tiny_cfg(f"data.source={source}"))


def test_labels_of_any_text_reach_mlflow_under_safe_unique_names(sample_dir, tmp_path, tiny_cfg, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)   # a fresh sqlite store makes ./mlruns for its default experiment

    from vidopt.tracking import MLflowLogger

    labels = {"move_left": "a+b%&(1)", "move_right": "O'Brien \"q\"", "move_up": "a_b__1_"}
    source = copy_classes(sample_dir, tmp_path / "src", labels)
    cfg = tiny_cfg(f"data.source={source}")
    dataset = ingest.run(cfg)
    assert dataset.classes == sorted(labels.values())   # the labels themselves, for display
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:   # artifacts in tmp_path too, not ./mlruns
        experiment = mlflow.create_experiment("labels", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment) as parent, mlflow.start_run(nested=True) as child:
            ingest.log_dataset(MLflowLogger(child), dataset, parent.info.run_id, ingest.open_store(cfg.run))
        metrics = mlflow.get_run(child.info.run_id).data.metrics
    finally:
        mlflow.set_tracking_uri(previous)
    counts = {k: v for k, v in metrics.items() if k.startswith("count.total.")}
    assert len(counts) == 3 and sum(counts.values()) == dataset.num_videos   # three labels, three names
    assert "count.total.a_b__1_" in counts   # a label that is already safe keeps its name


def still_png(path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (48, 48), (200, 30, 30)).save(path, format="PNG")


def test_a_still_image_named_like_a_video_is_quarantined_as_one(sample_dir, tmp_path, tiny_cfg):
    source = copy_classes(sample_dir, tmp_path / "src", {"move_left": "left", "move_right": "right"})
    still_png(source / "left" / "photo.mp4")
    dataset = ingest.run(tiny_cfg(f"data.source={source}"))
    quarantined = {q["key"]: q["reason"] for q in read_jsonl(Path(dataset.quarantine_uri))}
    assert "a still image (png, 1 frame)" in quarantined["left/photo.mp4"]
    assert "left/photo.mp4" not in {r["key"] for r in read_jsonl(Path(dataset.manifest_uri))}


def test_a_copied_clip_is_the_newcomer_and_the_original_keeps_its_place(sample_dir, tmp_path, tiny_cfg):
    source = copy_classes(sample_dir, tmp_path / "src", {"move_left": "left", "move_right": "right"})
    cfg = tiny_cfg(f"data.source={source}")
    first = {r["key"]: r["split"] for r in read_jsonl(Path(ingest.run(cfg).manifest_uri))}
    original = sorted(first)[-1]                    # the last key: a copy named "0000..." sorts before it
    shutil.copy(source / original, source / original.split("/")[0] / "0000-copy.mp4")
    grown = ingest.run(cfg)
    rows = {r["key"]: r["split"] for r in read_jsonl(Path(grown.manifest_uri))}
    quarantined = {q["key"]: q["reason"] for q in read_jsonl(Path(grown.quarantine_uri))}
    assert rows == first   # every key where it was, the original included
    copy = original.split("/")[0] + "/0000-copy.mp4"
    assert quarantined[copy] == f"duplicate content of {original}"


@pytest.mark.parametrize("damage", ["", "garbage{", "[]\n", '{"ok": true}\n'])
def test_a_damaged_probe_cache_is_set_aside_and_the_files_probed_again(damage, sample_dir, tmp_path, tiny_cfg,
                                                                       caplog):
    source = copy_classes(sample_dir, tmp_path / "src", {"move_left": "left", "move_right": "right"})
    cfg = tiny_cfg(f"data.source={source}")
    first = ingest.run(cfg)
    probes = sorted((Path(cfg.run.project_dir) / "cache" / "probes").glob("*.json"))
    assert probes
    for probe in probes:
        probe.write_text(damage)
    with caplog.at_level(logging.WARNING, logger="vidopt.ingest"):
        again = ingest.run(cfg)
    assert again.data_version == first.data_version and again.num_videos == first.num_videos
    assert "probe cache" in caplog.text and "probing the file again" in caplog.text
    assert all(json.loads(p.read_text())["ok"] for p in probes)   # rewritten whole
    assert len(list(probes[0].parent.glob("*.bad"))) == len(probes)
