#!/usr/bin/env bash
# Install vidopt (with its test extras) into a virtualenv kept outside the clone, keyed by the dependency pins, and link
# it as ./.venv. The first install downloads torch 2.9.0 (a CUDA build, ~4 GB; torch-xla 2.9.0 needs exactly it) and
# takes a few minutes; later runs with the same pins reuse the venv and take seconds.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
key=$("$py" - "$root/pyproject.toml" <<'PY'
import hashlib, json, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
pins = [sys.version_info[:2], project["dependencies"], project.get("optional-dependencies", {})]
print(hashlib.sha256(json.dumps(pins, sort_keys=True).encode()).hexdigest()[:12])
PY
)
venvs=${VIDOPT_VENV_ROOT:-$HOME/.cache/vidopt/venvs}
venv=$venvs/$key
if [ ! -f "$venv/.complete" ]; then
  echo "setup: creating $venv (dependency pins changed or first install)"
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install --progress-bar off -e "$root[test]"
  touch "$venv/.complete"
  # Keep only the venv of the current pins: each is ~7 GB.
  find "$venvs" -mindepth 1 -maxdepth 1 ! -name "$key" -exec rm -rf {} +
fi
# The venv may be shared by several clones: point its editable install at this one (no dependency resolution).
"$venv/bin/pip" install -q --no-deps -e "$root"
ln -sfn "$venv" "$root/.venv"
echo "setup: $root/.venv -> $venv"
