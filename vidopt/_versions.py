"""Import-time check that torch and torch-xla are a working pair.

torch-xla declares no torch requirement, so pip happily installs it beside a torch it cannot load; the failure then
shows up late as an undefined `_XLAC` symbol. We read installed versions from metadata (no heavy imports) and fail early.
"""
from importlib import metadata


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def check_torch_xla_pairing() -> None:
    try:
        xla = metadata.version("torch-xla")
    except metadata.PackageNotFoundError:
        return  # no TPU back-end here (e.g. a GPU host with its own torch): nothing to pair
    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        raise ImportError(f"vidopt: torch-xla {xla} is installed but torch is not; install torch=={xla}") from None
    if _major_minor(torch) != _major_minor(xla):
        raise ImportError(
            f"vidopt: torch {torch} cannot load torch-xla {xla} (it fails with an undefined _XLAC symbol). "
            f"Install the pinned pair: pip install 'torch=={xla}' 'torch-xla=={xla}' (see pyproject.toml), "
            f"or uninstall torch-xla on hosts without the TPU target."
        )
