"""Model directories and training checkpoints.

A model directory holds `weights.safetensors`, `arch.json` (rebuilds the module anywhere, pruned or not), `metrics.json`
and `config.json` (the resolved config that made it). It is written to a temp dir and renamed, so it is whole or absent.
Training checkpoints (`last.pt`) hold tensors and plain values only and load with `weights_only=True`.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vidopt.models import StudentArch, TeacherArch, arch_from_dict, build_model
from vidopt.storage import atomic_dir, atomic_path, sha256_file

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


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomically replace the training checkpoint (model/optimizer state dicts, epoch, history)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None
