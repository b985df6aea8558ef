#!/usr/bin/env bash
# Set up ./.venv for this clone.
#
# The dependencies (torch 2.9.0 as a CUDA build, ~4 GB, with torch-xla, Ray, Prefect, MLflow and the test extras) go
# into a venv shared by every clone on the machine: ~/.cache/vidopt/venvs/<hash of the pins> (VIDOPT_VENV_ROOT moves
# the folder). It is built once per set of pins, which downloads them and takes a few minutes, and it holds no vidopt.
# ./.venv is this clone's own small venv: a .pth file puts the shared venv's site-packages on its path after its own,
# vidopt is installed into it editable from this clone (no dependencies), and its bin/ holds the shared venv's console
# scripts (pytest, prefect, ray, mlflow, pip, ...) run by its own python. So clones install and test side by side, each
# importing its own vidopt; a later call with the same pins takes seconds.
#
# Only this clone's ./.venv and the shared venv of its pins are written. Shared venvs of other pins are pruned: on every
# call those unused for VIDOPT_VENV_MAX_AGE_DAYS days (30; every python started from a clone's .venv marks its shared
# venv used), and with --prune every one except those that another clone's .venv still uses and that were used within
# that many days. A venv whose lock another call holds (it is being built) is never removed.
#
#   bash infra/setup.sh                set up ./.venv, then prune by age
#   bash infra/setup.sh --prune        set up ./.venv, then prune every other shared venv no other clone uses
#   bash infra/setup.sh --prune-only   prune only (by age, or with --prune as above); installs nothing
#   bash infra/setup.sh --key          print the key of the current pins
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd -P)
py=${PYTHON:-python3}
max_age_days=${VIDOPT_VENV_MAX_AGE_DAYS:-30}
prune_all=0 install=1 print_key=0
for arg in "$@"; do
  case $arg in
    --prune) prune_all=1 ;;
    --prune-only) install=0 ;;
    --key) print_key=1 ;;
    *) echo "usage: bash infra/setup.sh [--prune] [--prune-only] [--key]" >&2
       exit 2 ;;
  esac
done
[[ $max_age_days =~ ^[0-9]+$ ]] || { echo "setup: VIDOPT_VENV_MAX_AGE_DAYS must be a whole number of days" >&2; exit 2; }

# pins key|requirements|build-requires: the key of the pins, or the requirement lines the shared venv installs.
pins() {
  "$py" - "$root/pyproject.toml" "$1" <<'PY'
import hashlib, json, sys, tomllib
pyproject = tomllib.load(open(sys.argv[1], "rb"))
project = pyproject["project"]
extras = project.get("optional-dependencies", {})
if sys.argv[2] == "key":
    pins = [sys.version_info[:2], project["dependencies"], extras]
    print(hashlib.sha256(json.dumps(pins, sort_keys=True).encode()).hexdigest()[:12])
elif sys.argv[2] == "requirements":
    print("\n".join(project["dependencies"] + extras.get("test", [])))
else:  # a clone's editable install of vidopt builds with the shared venv's setuptools (and wheel, which setuptools
    # before 70.1 builds editable wheels with) instead of downloading them into an isolated build environment
    print("\n".join(pyproject["build-system"]["requires"] + ["wheel"]))
PY
}
key=$(pins key)
if [ "$print_key" = 1 ]; then echo "$key"; exit 0; fi
venvs=${VIDOPT_VENV_ROOT:-$HOME/.cache/vidopt/venvs}
[ "$install" = 1 ] && mkdir -p "$venvs"
[ -d "$venvs" ] && venvs=$(cd "$venvs" && pwd -P)
venv=$venvs/$key
clone_id=$(printf '%s' "$root" | sha256sum | cut -c1-16)

# Seconds since the epoch when a shared venv was last used (its stamp, else its completion, else the folder).
last_used() {
  local f
  for f in "$1/.last-used" "$1/.complete" "$1"; do
    if [ -e "$f" ]; then stat -c %Y "$f"; return; fi
  done
}

# Whether a clone other than this one still has its .venv on the shared venv $1; names it in $other.
used_by_other_clone() {
  local record clone
  for record in "$1"/.clones/*; do
    [ -f "$record" ] || continue
    clone=$(cat "$record")
    [ "$clone" != "$root" ] || continue
    if [ "$(head -n1 "$clone/.venv/vidopt-deps" 2>/dev/null)" = "$1" ]; then other=$clone; return 0; fi
  done
  return 1
}

prune() {
  [ -d "$venvs" ] || return 0
  local cutoff v name
  cutoff=$(( $(date +%s) - max_age_days * 86400 ))
  for v in "$venvs"/*; do
    name=${v##*/}
    # Only folders named like a key are this script's; the current pins' venv is never removed.
    [[ $name =~ ^[0-9a-f]{12}$ ]] && [ -d "$v" ] && [ ! -L "$v" ] && [ "$name" != "$key" ] || continue
    if [ "$(last_used "$v")" -ge "$cutoff" ]; then
      [ "$prune_all" = 1 ] || continue
      if used_by_other_clone "$v"; then echo "setup: keeping $v (used by $other)"; continue; fi
    fi
    # The lock, taken without waiting, keeps a venv that another call is building or pruning.
    if ( flock -n 9 || exit 1; rm -rf "$v" ) 9>"$venvs/.$name.lock"; then
      echo "setup: removed $v (pins no longer used here)"
    else
      echo "setup: keeping $v (locked by another setup.sh)"
    fi
  done
}

if [ "$install" = 0 ]; then prune; exit 0; fi

# Everything below writes the shared venv of these pins or relies on it staying, so it runs under that venv's lock:
# two calls with the same pins wait for each other, and no prune removes the venv meanwhile.
exec 9>"$venvs/.$key.lock"
flock 9
if [ ! -f "$venv/.complete" ]; then
  rm -rf "$venv"
  # A new set of pins starts from a copy of the newest complete venv of this Python, when there is one: pip then
  # fetches only the pins that changed (a few MB instead of torch's ~4 GB). Packages no longer pinned stay installed.
  seed=$(ls -td "$venvs"/*/.complete 2>/dev/null | while read -r done_; do
           v=${done_%/.complete}
           [[ ${v##*/} =~ ^[0-9a-f]{12}$ ]] && [ -d "$v/lib/python$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')" ] \
             && { echo "$v"; break; }
         done)
  if [ -n "$seed" ]; then
    echo "setup: creating $venv from a copy of $seed (pins changed)"
    cp -a --reflink=auto "$seed" "$venv"
    rm -rf "$venv/.complete" "$venv/.clones" "$venv/.last-used" "$venv/.build-requires"
    # its scripts' shebangs and activate files name the venv they were made in
    { grep -lsIF "$seed" "$venv"/bin/* || true; } | xargs -r sed -i "s|$seed|$venv|g"
  else
    echo "setup: creating $venv (first install of these pins)"
    "$py" -m venv "$venv"
  fi
  # `python -m pip`: a copied venv's own bin/pip still names the python of the venv it was copied from
  "$venv/bin/python" -m pip install -q --upgrade pip
  { pins requirements; pins build-requires; } > "$venv/requirements.txt"
  "$venv/bin/python" -m pip install --progress-bar off -r "$venv/requirements.txt"
  pins build-requires > "$venv/.build-requires"
  touch "$venv/.complete"
fi
build_requires=$(pins build-requires)
if [ "$(cat "$venv/.build-requires" 2>/dev/null)" != "$build_requires" ]; then
  # A shared venv that has the pins but not yet the build requirements a clone's editable install needs.
  printf '%s\n' "$build_requires" | "$venv/bin/python" -m pip install -q -r /dev/stdin
  printf '%s\n' "$build_requires" > "$venv/.build-requires"
fi
touch "$venv/.last-used"
mkdir -p "$venv/.clones"
printf '%s\n' "$root" > "$venv/.clones/$clone_id"

# ./.venv is current when it is a folder made for this shared venv and this pyproject.toml (entry points, packages).
want=$(printf '%s\n%s' "$venv" "$(sha256sum < "$root/pyproject.toml" | cut -c1-64)")
if [ -d "$root/.venv" ] && [ ! -L "$root/.venv" ] && [ "$(cat "$root/.venv/vidopt-deps" 2>/dev/null)" = "$want" ]; then
  echo "setup: $root/.venv is up to date (dependencies from $venv)"
else
  # Built beside ./.venv under a name .gitignore covers, then moved into place, so that ./.venv is whole at any time.
  build=$root/.vidopt-venv-build old=$root/.vidopt-venv-old
  trap 'rm -rf "$build"' EXIT
  rm -rf "$build" "$old"
  "$venv/bin/python" -m venv --without-pip --prompt "${root##*/}" "$build"
  "$build/bin/python" - "$venv" "$build" "$root/.venv" <<'PY'
import os, sys, sysconfig

shared, build, final = sys.argv[1:4]
def sites(prefix):
    scheme = {"base": prefix, "platbase": prefix}
    return list(dict.fromkeys(sysconfig.get_path(k, "venv", scheme) for k in ("purelib", "platlib")))
loader = f'''"""Puts the shared venv of vidopt's pinned dependencies (infra/setup.sh) on sys.path after this venv's own
site-packages, and marks it used so that setup.sh's pruning keeps it."""
import os
import site
import sys

SHARED = {shared!r}
for _site in {sites(shared)!r}:
    if _site not in sys.path:
        sys.path.append(_site)
        for _name in sorted(os.listdir(_site)):
            # Editable installs there are no dependency (vidopt comes from this venv's own install): skipped.
            if _name.endswith(".pth") and not _name.startswith("__editable__"):
                site.addpackage(_site, _name, None)
try:
    os.utime(os.path.join(SHARED, ".last-used"))
except OSError:
    pass
'''
site_dir = sites(build)[0]
with open(os.path.join(site_dir, "_vidopt_shared_deps.py"), "w") as f:
    f.write(loader)
with open(os.path.join(site_dir, "_vidopt_shared_deps.pth"), "w") as f:
    f.write("import _vidopt_shared_deps\n")
PY
  # Its build warnings are shown only when it fails.
  if ! log=$("$build/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$root" 2>&1); then
    printf '%s\n' "$log" >&2
    exit 1
  fi
  "$build/bin/python" - "$venv" "$build" "$root/.venv" <<'PY'
import os, shutil, sys, sysconfig

shared, build, final = sys.argv[1:4]
shared_bin, build_bin = os.path.join(shared, "bin"), os.path.join(build, "bin")
# The shared venv's console scripts, run by this venv's python so that they import this clone's vidopt. Scripts this
# venv already has (vidopt's own) and the interpreter and activation files stay as they are.
for name in sorted(os.listdir(shared_bin)):
    src, dst = os.path.join(shared_bin, name), os.path.join(build_bin, name)
    if name.startswith(("python", "activate", "Activate")) or os.path.lexists(dst) or os.path.islink(src) \
            or not os.path.isfile(src):
        continue
    with open(src, "rb") as f:
        text = f.read()
    if (shared_bin + "/python").encode() not in text[:512]:
        continue
    with open(dst, "wb") as f:
        f.write(text.replace((shared_bin + "/").encode(), (build_bin + "/").encode()))
    os.chmod(dst, 0o755)
# The venv's own files name the folder it was built in: they name ./.venv, where it is moved, and no bytecode compiled
# there is kept.
shutil.rmtree(os.path.join(sysconfig.get_path("purelib"), "__pycache__"), ignore_errors=True)
for path in [os.path.join(build, "pyvenv.cfg")] + [os.path.join(build_bin, n) for n in os.listdir(build_bin)]:
    if os.path.isfile(path) and not os.path.islink(path):
        with open(path, "rb") as f:
            text = f.read()
        if build.encode() in text:
            with open(path, "wb") as f:
                f.write(text.replace(build.encode(), final.encode()))
PY
  printf '%s\n' "$want" > "$build/vidopt-deps"
  if [ -e "$root/.venv" ] || [ -L "$root/.venv" ]; then mv -T "$root/.venv" "$old"; fi
  mv -T "$build" "$root/.venv"
  rm -rf "$old"
  echo "setup: $root/.venv set up (vidopt from this clone, dependencies from $venv)"
fi
# When the shared venv holds vidopt installed editable from this clone (as when ./.venv was a link to it), that install
# goes: this clone's .venv has its own, and every clone's .venv skips editable installs in the shared venv.
for record in "$venv"/lib/python*/site-packages/vidopt-*.dist-info/direct_url.json; do
  if [ -f "$record" ] && grep -qF "\"url\": \"file://$root\"" "$record"; then
    (cd / && "$venv/bin/python" -m pip uninstall -q -y vidopt)
  fi
done
exec 9>&-
prune
