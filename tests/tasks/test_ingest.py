"""Ingestion on real encoded videos: a local folder with bad files mixed in, an S3 bucket on a moto server, manifests."""
import json
import shutil
from pathlib import Path

import boto3
import pytest

from tasks import ingest
from vidopt.ingestion import IngestError
from vidopt.storage import read_jsonl


def _quarantine(dataset) -> dict[str, str]:
    return {q["key"]: q["reason"] for q in read_jsonl(Path(dataset.quarantine_uri))}


@pytest.fixture
def messy_dir(sample_dir, tmp_path) -> Path:
    """The tiny sample dataset plus every kind of bad file a real bucket collects."""
    root = tmp_path / "bucket"
    shutil.copytree(sample_dir, root)
    label = sorted(p.name for p in root.iterdir())[0]
    good = sorted((root / label).glob("*.mp4"))[0].read_bytes()
    (root / label / "empty.mp4").write_bytes(b"")
    (root / label / "truncated.mp4").write_bytes(good[: len(good) // 3])
    (root / label / "notes.txt").write_text("not a video")
    (root / label / "noise.mp4").write_bytes(bytes(range(256)) * 40)
    (root / label / "zz_copy.mp4").write_bytes(good)
    (root / "unlabeled.mp4").write_bytes(good)
    return root


def test_folder_ingest_keeps_good_videos_and_quarantines_the_rest(messy_dir, sample_dir, tiny_cfg):
    cfg = tiny_cfg(f"data.source={messy_dir}")
    dataset = ingest.run(cfg)

    expected = sorted(p.relative_to(sample_dir).as_posix() for p in sample_dir.rglob("*.mp4"))
    rows = read_jsonl(Path(dataset.manifest_uri))
    assert sorted(r["key"] for r in rows) == [k for k in expected if not k.endswith("/zz_copy.mp4")]
    assert dataset.num_videos == len(rows) and dataset.classes == sorted({r["label"] for r in rows})
    assert len(dataset.classes) >= 8
    spec = cfg.data.sample
    for row in rows:
        assert row["codec"] == "h264" and row["num_frames"] == spec.frames
        assert (row["width"], row["height"]) == (spec.width, spec.height)
        assert row["decoder"] in ("decord", "pyav") and row["split"] in ("train", "val", "test")
        assert len(row["sha256"]) == 64 and row["size"] > 0

    reasons = _quarantine(dataset)
    label = sorted(p.name for p in messy_dir.iterdir() if p.is_dir())[0]
    assert reasons[f"{label}/empty.mp4"] == "zero-byte file"
    assert "duplicate content of" in reasons[f"{label}/zz_copy.mp4"]
    assert reasons["unlabeled.mp4"].startswith("no label")
    for bad in ("truncated.mp4", "notes.txt", "noise.mp4"):
        assert reasons[f"{label}/{bad}"], bad  # a non-empty reason from the decoder
    assert dataset.num_quarantined == 6
    total = sum(c["total"] for c in dataset.class_counts.values())
    assert total == dataset.num_videos == sum(c["train"] + c["val"] + c["test"] for c in dataset.class_counts.values())


def test_reingest_is_stable_and_new_files_never_move_old_ones(sample_dir, tmp_path, tiny_cfg):
    """With data.stratify false each file's split is its own hash's: a new file moves no old one (stratified splits
    trade that for every class's share of val and test)."""
    root = tmp_path / "bucket"
    shutil.copytree(sample_dir, root)
    # no val split: every class of the 8-video sample gets train and test videos by hash alone
    cfg = tiny_cfg(f"data.source={root}", "data.stratify=false", "data.split_fractions=[0.5,0,0.5]")
    first = ingest.run(cfg)
    assert ingest.run(cfg).data_version == first.data_version

    label = first.classes[0]
    src = sorted((root / label).glob("*.mp4"))[0]
    from vidopt.sample_data import render_video, write_mp4
    import numpy as np

    frames = render_video(label, np.random.default_rng(12345), cfg.data.sample)
    write_mp4(frames, root / label / "new.mp4", cfg.data.sample.fps)
    grown = ingest.run(cfg)
    assert grown.data_version != first.data_version and grown.num_videos == first.num_videos + 1
    old = {r["key"]: r["split"] for r in read_jsonl(Path(first.manifest_uri))}
    new = {r["key"]: r["split"] for r in read_jsonl(Path(grown.manifest_uri))}
    assert all(new[k] == split for k, split in old.items())
    assert src.exists()  # ingestion never touches the source


def test_s3_ingest_matches_folder_ingest_and_caches_downloads(moto_server, sample_dir, tiny_cfg):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="clips")
    for path in sorted(sample_dir.rglob("*.mp4")):
        s3.upload_file(str(path), "clips", f"incoming/{path.relative_to(sample_dir).as_posix()}")
    s3.put_object(Bucket="clips", Key="incoming/../escape.mp4", Body=b"x")
    s3.put_object(Bucket="clips", Key="incoming/walk/../../escape2.mp4", Body=b"x")
    s3.put_object(Bucket="clips", Key="incoming//escape3.mp4", Body=b"x")

    cfg = tiny_cfg("data.source=s3://clips/incoming")
    dataset = ingest.run(cfg)
    assert dataset.num_videos == len(list(sample_dir.rglob("*.mp4")))
    assert dataset.downloaded == dataset.num_videos
    local = ingest.run(tiny_cfg(f"data.source={sample_dir}"))
    assert dataset.data_version == local.data_version  # content decides the version, not where it lives

    reasons = _quarantine(dataset)
    for key in ("../escape.mp4", "walk/../../escape2.mp4", "/escape3.mp4"):
        assert "rejected" in reasons[key], key
    project = Path(cfg.run.project_dir)
    assert not list(project.parent.rglob("escape*.mp4"))

    again = ingest.run(cfg)
    assert again.downloaded == 0 and again.data_version == dataset.data_version


def test_manifest_csv_labels_and_missing_entries(sample_dir, tmp_path, tiny_cfg):
    root = tmp_path / "flat"
    root.mkdir()
    lines = ["path,label"]
    for i, path in enumerate(sorted(sample_dir.rglob("*.mp4"))):
        shutil.copy(path, root / f"clip{i:03d}.mp4")
        lines.append(f"clip{i:03d}.mp4,{path.parent.name}")
    lines.append("gone.mp4,move_left")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")

    dataset = ingest.run(tiny_cfg(f"data.source={root}", "data.manifest=manifest.csv"))
    assert dataset.num_videos == len(lines) - 2
    assert _quarantine(dataset) == {"gone.mp4": "listed in the manifest but not found in the source"}
    labels = {r["key"]: r["label"] for r in read_jsonl(Path(dataset.manifest_uri))}
    assert labels["clip000.mp4"] == sorted(sample_dir.rglob("*.mp4"))[0].parent.name


def test_manifest_with_escaping_path_is_rejected(tmp_path, tiny_cfg):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.jsonl").write_text(json.dumps({"path": "../../etc/passwd", "label": "x"}) + "\n")
    with pytest.raises(IngestError, match=r"m.jsonl:1: .*rejected"):
        ingest.run(tiny_cfg(f"data.source={tmp_path / 'src'}", "data.manifest=m.jsonl"))


def test_nothing_usable_is_a_clear_error(tmp_path, tiny_cfg):
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "x.mp4").write_bytes(b"")
    with pytest.raises(IngestError, match=r"no usable videos .*a/x.mp4: zero-byte file"):
        ingest.run(tiny_cfg(f"data.source={tmp_path / 'src'}"))
    with pytest.raises(IngestError, match="does not exist"):
        ingest.run(tiny_cfg(f"data.source={tmp_path / 'missing'}", "data.sample_if_missing=false"))
