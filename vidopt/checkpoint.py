"""Model directories and training checkpoints.

A model directory holds `weights.safetensors`, `arch.json` (rebuilds the module anywhere, pruned or not), `metrics.json`
and `config.json` (the resolved config that made it). It is written to a temp dir and renamed, so it is whole or absent.
Training checkpoints (`last.pt`) hold tensors and plain values only and load with `weights_only=True`; each save
keeps the one before it (`last.prev.pt`), and a load that finds one truncated or corrupted sets it aside
(`last.pt.bad`) and falls back to the one before it, or to none (train from scratch).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vidopt.models import StudentArch, TeacherArch, arch_from_dict, build_model
from vidopt.storage import atomic_dir, atomic_path, atomic_write_text, sha256_file

log = logging.getLogger("vidopt.checkpoint")

WEIGHTS, ARCH, METRICS, CONFIG = "weights.safetensors", "arch.json", "metrics.json", "config.json"


def save_model_dir(out: Path, model: nn.Module, arch: TeacherArch | StudentArch, metrics: dict[str, float],
                   config: dict[str, Any], extra_files: dict[str, Path] | None = None) -> str:
    """Write the model directory atomically; returns the weights' sha256."""
    with atomic_dir(out) as tmp:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        (tmp / ARCH).write_text(arch.model_dump_json(indent=2))
        (tmp / METRICS).write_text(json.dumps(metrics, indent=2, sort_keys=True))
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        for name, src in (extra_files or {}).items():   # files, or folders (the int8 forms)
            (shutil.copytree if Path(src).is_dir() else shutil.copy2)(src, tmp / name)
    return sha256_file(out / WEIGHTS)


def load_model_dir(path: str | Path) -> tuple[nn.Module, TeacherArch | StudentArch]:
    """Rebuild the module from arch.json and load its weights (safetensors: no code runs on load)."""
    path = Path(path)
    arch = arch_from_dict(json.loads((path / ARCH).read_text()))
    model = build_model(arch)
    model.load_state_dict(load_file(str(path / WEIGHTS)))
    return model.eval(), arch


TORCHVISION_WEIGHTS = "torchvision:"  # teacher.init=torchvision:R2Plus1D_18_Weights.KINETICS400_V1


def load_state_dict_uri(uri: str) -> dict[str, torch.Tensor]:
    """A user-supplied checkpoint: safetensors, a torch file loaded with weights_only=True (untrusted input), or
    `torchvision:<weights name>`, torchvision's published weights."""
    from vidopt.storage import is_s3, s3_client, split_s3

    if uri.startswith(TORCHVISION_WEIGHTS):
        return torchvision_state_dict(uri.removeprefix(TORCHVISION_WEIGHTS))
    if is_s3(uri):
        with tempfile.TemporaryDirectory(prefix="vidopt-init-") as tmp:  # removed once loaded into memory
            local = Path(tmp) / Path(uri).name
            bucket, key = split_s3(uri)
            s3_client().download_file(bucket, key, str(local))
            return _load_state_dict_file(str(local))
    return _load_state_dict_file(uri)


def torchvision_state_dict(name: str) -> dict[str, torch.Tensor]:
    """torchvision's weights `name` (e.g. R2Plus1D_18_Weights.KINETICS400_V1) through torch hub's cache: downloaded
    once where the machine reaches download.pytorch.org (the file's hash checked against its name), read from
    <torch hub dir>/checkpoints/ after that, or where someone put the file; loaded with weights_only=True."""
    from torchvision.models import get_weight

    try:
        weights = get_weight(name)
    except (KeyError, ValueError) as err:
        raise ValueError(f"teacher.init torchvision:{name}: not a torchvision weights name ({err}); e.g. "
                         "torchvision:R2Plus1D_18_Weights.KINETICS400_V1") from err
    try:
        return torch.hub.load_state_dict_from_url(weights.url, map_location="cpu", check_hash=True, weights_only=True)
    except OSError as err:  # URLError, a DNS failure, a full disk
        raise RuntimeError(
            f"teacher.init torchvision:{name}: could not fetch {weights.url} ({err}). Without access to it, copy the "
            f"file into {Path(torch.hub.get_dir()) / 'checkpoints'} or pass its path as teacher.init") from err


def _load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state) if isinstance(state, dict) else state


class CheckpointError(ValueError):
    """A training checkpoint that cannot be used (truncated, corrupted, not a state dict); the message says why."""


# Hashes kept on record: more than the files a crash can leave (the new, current and previous ones, the previous
# one older after a save that found no current file); an older hash only admits a file that was once whole.
KEPT_HASHES = 8


def previous_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.prev{path.suffix}")  # last.pt -> last.prev.pt


def hashes_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.sha256")  # last.pt -> last.pt.sha256


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Replace the training checkpoint (model/optimizer state dicts, epoch, history) so that a kill at any point leaves
    one that loads: the state goes to a temp file, its sha256 joins `<name>.sha256`, the current file becomes
    `<stem>.prev.pt`, and the temp file, fsynced, is renamed into place. A crash in between leaves the old file, no
    file (the previous one serves), or the new one, each with its hash on record."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        known = _known_hashes(path)
        if not known and path.exists():  # written before hashes were kept, or the record was lost: vouch for it
            known = [sha256_file(path)]
        digest = sha256_file(tmp)
        hashes = [digest, *(h for h in known if h != digest)][:KEPT_HASHES]
        atomic_write_text(hashes_path(path), "".join(f"{h}\n" for h in hashes))
        if path.exists():
            os.replace(path, previous_path(path))


def load_checkpoint(path: Path, required: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The newest usable training checkpoint at `path`, else the one saved before it, else None (train from
    scratch). A file that fails verification (see verified_checkpoint) is renamed `<name>.bad`, replacing an older
    one, with a warning; temp files left by a killed save are removed."""
    path = Path(path)
    for stale in path.parent.glob(".*.tmp"):  # nothing else writes this checkpoint while a run loads it
        if stale.name.startswith(f".{path.name}."):
            stale.unlink(missing_ok=True)
    known = _known_hashes(path)
    rejected = False
    for candidate in (path, previous_path(path)):
        if not candidate.exists():
            continue
        try:
            state = verified_checkpoint(candidate, required, known)
        except CheckpointError as err:
            bad = candidate.with_name(f"{candidate.name}.bad")
            os.replace(candidate, bad)
            log.warning("checkpoint %s: %s; set aside as %s", candidate, err, bad.name)
            rejected = True
            continue
        if candidate != path:
            log.warning("checkpoint %s: resuming from the one saved before it, %s", path, candidate.name)
        return state
    if rejected:
        log.warning("checkpoint %s: no usable checkpoint left; training starts from scratch", path)
    return None


def verified_checkpoint(path: Path, required: tuple[str, ...] = (), known: list[str] | None = None) -> dict[str, Any]:
    """The state in `path` if its sha256 is one recorded by save_checkpoint (when any are recorded: `known`, default
    read beside it), it loads with weights_only=True, and it is a dict holding `required`; else CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("no such file")
    if path.stat().st_size == 0:
        raise CheckpointError("empty file")
    known = _known_hashes(path) if known is None else known
    if known and (digest := sha256_file(path)) not in known:
        raise CheckpointError(f"sha256 {digest[:12]}... is none of those recorded in {hashes_path(path).name} "
                              "(truncated or corrupted)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a cut zip, stray bytes: torch raises RuntimeError, EOFError, IndexError, ...
        first_line = next(iter(str(err).splitlines()), "")[:200]
        raise CheckpointError(f"torch.load failed: {type(err).__name__} {first_line}".rstrip()) from err
    if not isinstance(state, dict):
        raise CheckpointError(f"holds a {type(state).__name__}, not a dict of state")
    if missing := [k for k in required if k not in state]:
        raise CheckpointError(f"no {', '.join(missing)} in it")
    return state


def _known_hashes(path: Path) -> list[str]:
    """The sha256 of the checkpoints last saved at `path`, newest first; [] when none are recorded or readable."""
    try:
        text = hashes_path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return []
    return [line for line in text.split() if re.fullmatch(r"[0-9a-f]{64}", line)]
