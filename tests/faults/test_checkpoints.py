"""Training checkpoints under faults: a file cut short by a kill, stray bytes, a flipped byte, a crash between the
steps of a save. Each load gives the newest whole state, sets a bad file aside with a one-line warning, and never
needs a person to delete anything."""
import os
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.vidopt.test_training import scores_then_crash
from vidopt.checkpoint import hashes_path, load_checkpoint, previous_path, save_checkpoint, verified_checkpoint
from vidopt.training import FIT_STATE_KEYS, FileCheckpoint, FitSpec, fit


def _state(epoch: int) -> dict:
    return {"epoch": epoch, "model": {"w": torch.full((64, 64), float(epoch))}, "history": [{"epoch": epoch}]}


def _two_saves(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _state(1))
    save_checkpoint(path, _state(2))
    return path


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF   # inside the tensor data: torch.load still succeeds, with a wrong weight
    path.write_bytes(bytes(data))


def _garbage(path):
    path.write_bytes(random.Random(0).randbytes(4096))


def _empty(path):
    path.write_bytes(b"")


def _another_state(path):
    torch.save(_state(7), path)   # loads fine, but was not written by save_checkpoint here


def test_saves_keep_the_previous_checkpoint_and_record_hashes(tmp_path):
    path = _two_saves(tmp_path)
    assert load_checkpoint(path)["epoch"] == 2
    assert verified_checkpoint(previous_path(path), known=hashes_path(path).read_text().split())["epoch"] == 1
    assert previous_path(path).name == "last.prev.pt" and hashes_path(path).name == "last.pt.sha256"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.prev.pt", "last.pt", "last.pt.sha256"]


@pytest.mark.parametrize("damage, reason", [(_truncate, "sha256"), (_flip_a_byte, "sha256"), (_garbage, "sha256"),
                                            (_empty, "empty file"), (_another_state, "sha256")])
def test_a_damaged_checkpoint_is_set_aside_and_the_one_before_it_loaded(tmp_path, caplog, damage, reason):
    path = _two_saves(tmp_path)
    damage(path)
    damaged = path.read_bytes()
    with caplog.at_level("WARNING", logger="vidopt"):
        state = load_checkpoint(path, required=("epoch", "model"))
    assert state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.ones(64, 64))
    (warning, resumed) = [r.getMessage() for r in caplog.records]
    assert str(path) in warning and reason in warning and "set aside as last.pt.bad" in warning
    assert "\n" not in warning and "last.prev.pt" in resumed
    assert (tmp_path / "last.pt.bad").read_bytes() == damaged and not path.exists()
    # the next save and load go on as usual, with nothing removed by hand
    save_checkpoint(path, _state(3))
    assert load_checkpoint(path)["epoch"] == 3 and load_checkpoint(previous_path(path))["epoch"] == 1


@pytest.mark.parametrize("damage", [_truncate, _garbage, _empty])
def test_without_recorded_hashes_a_checkpoint_is_checked_by_loading_it(tmp_path, caplog, damage):
    """A checkpoint from before hashes were recorded, or whose record was lost: torch.load decides."""
    path = _two_saves(tmp_path)
    hashes_path(path).unlink()
    assert load_checkpoint(path)["epoch"] == 2
    damage(path)
    with caplog.at_level("WARNING", logger="vidopt"):
        assert load_checkpoint(path)["epoch"] == 1
    assert "torch.load failed" in caplog.text or "empty file" in caplog.text
    assert (tmp_path / "last.pt.bad").exists()


def test_a_state_missing_what_fit_reads_is_set_aside(tmp_path, caplog):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {k: 0 for k in FIT_STATE_KEYS})
    save_checkpoint(path, {"epoch": 3})
    with caplog.at_level("WARNING", logger="vidopt"):
        assert FileCheckpoint(path).load()["best_model"] == 0
    assert "no model, optimizer" in caplog.text


def test_with_no_good_checkpoint_training_starts_from_scratch(tmp_path, caplog):
    path = tmp_path / "last.pt"
    assert load_checkpoint(path) is None and not caplog.records     # never saved: silently from scratch
    save_checkpoint(path, _state(1))
    _truncate(path)
    with caplog.at_level("WARNING", logger="vidopt"):
        assert load_checkpoint(path) is None
    assert "from scratch" in caplog.records[-1].getMessage() and (tmp_path / "last.pt.bad").exists()

    path = _two_saves(tmp_path / "both")
    _truncate(path)
    _garbage(previous_path(path))
    assert load_checkpoint(path) is None
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.prev.pt.bad", "last.pt.bad", "last.pt.sha256"]


@pytest.mark.parametrize("crash_at", [1, 2, 3])
def test_a_crash_at_any_step_of_a_save_leaves_a_checkpoint_that_loads(tmp_path, monkeypatch, caplog, crash_at):
    """Renames of a save: 1 the hash record, 2 current -> .prev, 3 temp -> current. A kill before rename n is
    simulated by failing it; the temp file a kill leaves behind is put back by hand, as a kill would leave it."""
    path = _two_saves(tmp_path)
    replace, calls = os.replace, []

    def crashing_replace(src, dst):
        calls.append(dst)
        if len(calls) == crash_at:
            (tmp_path / ".last.pt.killed.tmp").write_bytes(b"partial")
            raise KeyboardInterrupt("killed")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, _state(3))
    monkeypatch.setattr(os, "replace", replace)
    with caplog.at_level("WARNING", logger="vidopt"):
        state = load_checkpoint(path, required=("epoch", "model"))
    assert state["epoch"] == 2                                           # the newest whole state: none is bad
    assert not list(tmp_path.glob("*.bad")) and not list(tmp_path.glob(".*.tmp"))
    assert all("set aside" not in r.getMessage() for r in caplog.records)
    save_checkpoint(path, _state(4))
    assert load_checkpoint(path)["epoch"] == 4


def test_the_temp_file_is_on_disk_before_it_takes_the_checkpoints_name(tmp_path, monkeypatch):
    events, fsync, replace = [], os.fsync, os.replace
    real = os.path.realpath
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", real(f"/proc/self/fd/{fd}"))), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("replace", real(src), real(dst))),
                                                         replace(src, dst))[1])
    save_checkpoint(tmp_path / "last.pt", _state(1))
    (into_place,) = [e for e in events if e[0] == "replace" and e[2] == real(tmp_path / "last.pt")]
    at = events.index(into_place)
    assert events[at - 1] == ("fsync", into_place[1])               # the temp file synced, then renamed
    assert events[at + 1] == ("fsync", real(tmp_path))              # and the folder synced after the rename


def test_fit_resumes_from_the_checkpoint_before_a_truncated_one(tmp_path, caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.randn(6, 3, 4), torch.randint(0, 3, (6,))
    train = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        fit(model, train, [(x, y)], scores_then_crash([0.2, 0.3]), FitSpec(epochs=4, lr=1e-2), tmp_path / "last.pt")
    _truncate(tmp_path / "last.pt")                                     # the kill cut the epoch-2 file short
    with caplog.at_level("INFO", logger="vidopt"):
        result = fit(model, train, [(x, y)], lambda m: 0.5, FitSpec(epochs=4, lr=1e-2), tmp_path / "last.pt")
    assert result["resumed_from"] == 1 and result["epochs_run"] == 4
    assert [h["epoch"] for h in result["history"]] == [0, 1, 2, 3]
    assert "last.pt" in caplog.text and "set aside" in caplog.text
    assert "resumed from checkpoint after epoch 1" in caplog.text
    assert FileCheckpoint(tmp_path / "last.pt").load()["epoch"] == 4


def test_a_ray_train_checkpoint_that_fails_to_load_falls_back_to_the_one_before(tmp_path, monkeypatch, caplog):
    ray_train = pytest.importorskip("ray.train")
    from workers.train import STATE_FILE, RayCheckpoint

    folders = [tmp_path / f"checkpoint_2025-01-01_00-00-0{i}.000000" for i in (1, 2)]
    for epoch, folder in enumerate(folders, start=1):
        save_checkpoint(folder / STATE_FILE, {k: epoch for k in FIT_STATE_KEYS})
    _truncate(folders[1] / STATE_FILE)
    monkeypatch.setattr(ray_train, "get_checkpoint", lambda: ray_train.Checkpoint(str(folders[1])))
    with caplog.at_level("WARNING", logger="vidopt"):
        assert RayCheckpoint(rank=0).load()["epoch"] == 1
    assert folders[1].name in caplog.text and "sha256" in caplog.text
    _garbage(folders[0] / STATE_FILE)
    assert RayCheckpoint(rank=0).load() is None
    assert "from scratch" in caplog.records[-1].getMessage()
