"""Every value a careless user can type is refused at load, by the CLI, in one line naming the key and the value."""
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main

MARKER_SECRET = "vidopt-marker-secret-7f3a"


@pytest.mark.parametrize("override, names", [
    ("clips.batch_size=0", ["clips.batch_size", "0"]),
    ("clips.frames=0", ["clips.frames", "0"]),
    ("clips.frames=-1", ["clips.frames", "-1"]),
    ("teacher.lr=nan", ["teacher.lr", "nan"]),
    ("distill.lr=inf", ["distill.lr", "inf"]),
    ("data.probe_workers=0", ["data.probe_workers", "0"]),
    ("data.decoder_checks=0", ["data.decoder_checks", "0"]),
    ("quantize.threads=[0]", ["quantize.threads", "0"]),
    ("export.targets=[]", ["export.targets", "[]"]),
    ("data.min_frames=1", ["data.min_frames", "1"]),
    ("data.min_frames=4", ["data.min_frames", "4", "clips.frames"]),   # the tiny profile's clips hold 8 frames
])
def test_each_bad_value_is_one_line_naming_key_and_value(override, names, capsys, tmp_path):
    rc = main(["config", "--profile", "tiny", f"run.project_dir={tmp_path}", override])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("vidopt: error: config: ")
    for name in names:
        assert name in err, (name, err)


@pytest.mark.parametrize("text, expected", [
    ("run:\n  project_dir: [a\n", "line 3, column 1"),
    ("data:\n  source: x\n bad: y\n", "line 3, column 2"),
    ("- a\n- b\n", "must be a mapping"),
    ("just text\n", "must be a mapping"),
])
def test_a_broken_profile_names_file_line_and_column(text, expected, tmp_path, capsys):
    profile = tmp_path / "mine.yaml"
    profile.write_text(text)
    assert main(["run", "--profile", str(profile), f"run.project_dir={tmp_path / 'p'}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "mine.yaml" in err and expected in err, err
    assert not (tmp_path / "p").exists()   # refused before anything was written


@pytest.mark.parametrize("key", ["data.s3_endpoint_url", "run.store_endpoint_url", "tracking.uri"])
def test_credentials_in_a_url_are_refused_and_never_echoed(key, tmp_path, capsys):
    rc = main(["run", "--profile", "tiny", f"run.project_dir={tmp_path / 'p'}",
               f"{key}=http://admin:{MARKER_SECRET}@127.0.0.1:9/"])
    out = capsys.readouterr()
    assert rc == 2 and key in out.err and ("AWS_" in out.err or "MLFLOW_" in out.err)
    assert MARKER_SECRET not in out.err + out.out
    assert not (tmp_path / "p").exists()


def test_debug_shows_the_traceback_as_well(capsys, monkeypatch):
    monkeypatch.setenv("VIDOPT_DEBUG", "0")   # so the "1" main() sets is undone after the test
    assert main(["--debug", "config", "--profile", "tiny", "clips.batch_size=0"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("vidopt: error: config: clips.batch_size")


def test_a_stage_run_alone_gives_the_same_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tasks.ingest", "--profile", "tiny", f"run.project_dir={tmp_path}",
                           f"data.source={tmp_path / 'nowhere'}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    [error] = [line for line in proc.stderr.splitlines() if "error" in line]
    assert error.startswith("tasks.ingest: error: ingest: data.source ") and "does not exist" in error
    assert not Path(tmp_path / "nowhere").exists()
