"""infra/setup.sh prunes the shared venvs of other pins and nothing else: run with --prune-only against a temporary
VIDOPT_VENV_ROOT of fake venv folders (nothing is installed), it removes by age only the venvs unused for
VIDOPT_VENV_MAX_AGE_DAYS days and with --prune every other venv except one that another clone's .venv still uses; the
current pins' venv, folders not named like a key and a venv whose lock is held always stay. The clone's own .venv,
when these tests run from it, is a folder of its own that imports this clone's vidopt."""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SETUP = REPO / "infra" / "setup.sh"
DAY = 86400


def setup_sh(*args: str, root: Path, max_age: str | None = None) -> subprocess.CompletedProcess:
    # Should the script ignore its flags and set up a venv instead, pip finds no package and it fails at once, in root.
    env = {**os.environ, "VIDOPT_VENV_ROOT": str(root), "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull}
    env.pop("VIDOPT_VENV_MAX_AGE_DAYS", None)
    if max_age is not None:
        env["VIDOPT_VENV_MAX_AGE_DAYS"] = max_age
    return subprocess.run(["bash", str(SETUP), *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def key(tmp_path_factory) -> str:
    done = setup_sh("--key", root=tmp_path_factory.mktemp("key-venvs"))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "venvs"
    root.mkdir()
    return root.resolve()


def other_keys(key: str, n: int) -> list[str]:
    return [k for k in (c * 12 for c in "abcdef0123456789") if k != key][:n]


def fake_venv(root: Path, name: str, days_ago: float | None, complete: bool = True) -> Path:
    """A venv folder as setup.sh leaves it, last used `days_ago` days ago (None: no use stamp)."""
    venv = root / name
    (venv / "bin").mkdir(parents=True)
    t = time.time() - (days_ago or 0) * DAY
    stamps = ([".complete"] if complete else []) + ([".last-used"] if days_ago is not None else [])
    for stamp in stamps:
        (venv / stamp).touch()
        os.utime(venv / stamp, (t, t))
    return venv


def fake_clone(tmp_path: Path, name: str, venv: Path, uses: Path | None) -> Path:
    """A clone registered as a user of `venv` whose .venv is on `uses` (None: the clone has no .venv)."""
    clone = tmp_path / name
    clone.mkdir()
    if uses is not None:
        (clone / ".venv").mkdir()
        (clone / ".venv" / "vidopt-deps").write_text(f"{uses}\n0123\n")
    (venv / ".clones").mkdir(exist_ok=True)
    (venv / ".clones" / name).write_text(f"{clone}\n")
    return clone


def names(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if not p.name.startswith(".")}


def test_key_is_the_pins_hash(key):
    assert len(key) == 12 and set(key) <= set("0123456789abcdef")


def test_age_pruning_removes_only_venvs_unused_for_the_max_age(root, key):
    old, old_legacy, recent, building = other_keys(key, 4)
    fake_venv(root, key, days_ago=100)                  # the current pins': kept however old
    fake_venv(root, old, days_ago=40)
    legacy = fake_venv(root, old_legacy, days_ago=None)  # no use stamp: its completion counts
    os.utime(legacy / ".complete", (time.time() - 40 * DAY,) * 2)
    fake_venv(root, recent, days_ago=1)
    fake_venv(root, building, days_ago=None, complete=False)  # being created: only the folder's time
    fake_venv(root, "not-a-key", days_ago=100)

    done = setup_sh("--prune-only", root=root)
    assert done.returncode == 0, done.stderr
    assert names(root) == {key, recent, building, "not-a-key"}


def test_the_max_age_is_settable(root, key):
    [other] = other_keys(key, 1)
    fake_venv(root, other, days_ago=40)
    assert setup_sh("--prune-only", root=root, max_age="60").returncode == 0
    assert names(root) == {other}
    assert setup_sh("--prune-only", root=root, max_age="10").returncode == 0
    assert names(root) == set()


def test_a_bad_max_age_is_refused_and_nothing_removed(root, key):
    [other] = other_keys(key, 1)
    fake_venv(root, other, days_ago=400)
    done = setup_sh("--prune-only", root=root, max_age="30d")
    assert done.returncode == 2 and "VIDOPT_VENV_MAX_AGE_DAYS" in done.stderr
    assert names(root) == {other}


def test_prune_removes_all_but_the_current_venv_and_those_other_clones_use(root, key, tmp_path):
    used, moved_on, gone, stale = other_keys(key, 4)
    fake_venv(root, key, days_ago=100)
    fake_clone(tmp_path, "user", fake_venv(root, used, days_ago=2), uses=root / used)
    fake_clone(tmp_path, "moved", fake_venv(root, moved_on, days_ago=2), uses=root / key)
    fake_clone(tmp_path, "deleted", fake_venv(root, gone, days_ago=2), uses=None)
    # Used by another clone, but not within the max age: the age rule removes it.
    fake_clone(tmp_path, "idle", fake_venv(root, stale, days_ago=40), uses=root / stale)
    fake_venv(root, "not-a-key", days_ago=100)

    done = setup_sh("--prune", "--prune-only", root=root)
    assert done.returncode == 0, done.stderr
    assert names(root) == {key, used, "not-a-key"}
    assert f"keeping {root / used} (used by {tmp_path / 'user'})" in done.stdout


def test_a_venv_whose_lock_is_held_is_not_removed(root, key):
    [other] = other_keys(key, 1)
    fake_venv(root, other, days_ago=400)
    with open(root / f".{other}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = setup_sh("--prune", "--prune-only", root=root)
    assert done.returncode == 0, done.stderr
    assert names(root) == {other} and "locked" in done.stdout
    assert setup_sh("--prune", "--prune-only", root=root).returncode == 0
    assert names(root) == set()


def test_pruning_an_absent_venv_root_does_nothing(tmp_path):
    done = setup_sh("--prune", "--prune-only", root=tmp_path / "none")
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "none").exists()


@pytest.mark.skipif(Path(sys.prefix) != REPO / ".venv", reason="runs only from the clone's .venv that setup.sh made")
def test_the_clone_venv_is_its_own_and_imports_this_clone():
    import vidopt

    venv = REPO / ".venv"
    assert venv.is_dir() and not venv.is_symlink()
    assert Path(vidopt.__file__).resolve().is_relative_to(REPO)
    shared = Path((venv / "vidopt-deps").read_text().splitlines()[0])
    assert any(Path(p).is_relative_to(shared) for p in sys.path), "the shared venv's site-packages is on sys.path"
    assert not any(Path(p).is_relative_to(shared) for p in vidopt.__path__)
