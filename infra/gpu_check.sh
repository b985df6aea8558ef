#!/bin/bash
# GPU checks.
#
#   bash infra/gpu_check.sh full [OUT]            # on a machine with one GPU and the package registries (< 10 min):
#                                                 # install, the gpu profile for a few hundred training steps,
#                                                 # `vidopt bench train` on the GPU against a plain PyTorch loop, and
#                                                 # the GPU export target with CUDA; results in OUT (default .gpucheck)
#
# The GPU target alone on a bare GPU machine without the registries (the device tool sends the working tree, 64 MiB
# at most), as one prepared call:
#   bash infra/gpu_check.sh prepare PROJECT_DIR   # here: copy a finished run's int8 model dir and test clips, and
#                                                 # pydantic's wheels for Python 3.12, into .devrun/ (git-ignored)
#   bash infra/gpu_check.sh run                   # there (carry .devrun): workers/gpu.py on them with that machine's
#                                                 # own torch; the result JSON and stderr go to $OUT
# On a lent H200 (torch 2.11+cu130, no TensorRT, onnxruntime's CPU build, no pydantic, no network) `run` takes ~2
# minutes, most of it AOTInductor's compile.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
full)
    out=$(realpath -m "${2:-.gpucheck}")
    mkdir -p "$out"
    nvidia-smi -L
    bash infra/setup.sh
    # the gpu profile, shortened to a few hundred steps: teacher 10 epochs of 15 steps, distillation 8 of 113
    .venv/bin/vidopt run --profile gpu run.project_dir="$out/project" data.source="$out/project/bucket" \
        teacher.epochs=10 distill.epochs=8 prune.steps=1 prune.finetune_epochs=4 export.targets=[gpu] \
        2>&1 | tee "$out/run.log"
    .venv/bin/vidopt bench train --profile gpu --device gpu --workers 1 --epochs 3 \
        run.project_dir="$out/project" data.source="$out/project/bucket" --out "$out/bench_train" \
        2>&1 | tee "$out/bench_train.log"
    echo "gpu_check: run log, bench_train.{json,md} and the export results are in $out" ;;
prepare)
    project=${2:?usage: bash infra/gpu_check.sh prepare PROJECT_DIR}
    model=$(ls -td "$project"/stages/quantize/*/model 2>/dev/null | head -1 || true)
    clips=$(ls -t "$project"/cache/clip_sets/*-test-*.pt 2>/dev/null | head -1 || true)   # the store's clip sets
    if [ -z "$model" ] || [ -z "$clips" ]; then
        echo "gpu_check: no finished quantize stage or test clip set under $project (run the pipeline first)" >&2
        exit 1
    fi
    grep -qx '/.devrun/' .git/info/exclude 2>/dev/null || echo '/.devrun/' >> .git/info/exclude
    rm -rf .devrun && mkdir -p .devrun/wheels
    cp -r "$model" .devrun/model && cp "$clips" .devrun/test.pt
    .venv/bin/pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
        -d .devrun/wheels "pydantic==$(.venv/bin/python -c 'import pydantic; print(pydantic.VERSION)')"
    echo '{"target": "gpu", "model_dir": ".devrun/model", "int8_dir": ".devrun/model", "eval_clips": ".devrun/test.pt",
           "out_dir": ".devrun/out", "options": {"target": "gpu"}}' > .devrun/job.json
    du -sh .devrun ;;
run)
    out=${OUT:-/tmp}
    python3 -m pip install -q --no-index --no-deps --target /tmp/pydantic-wheels .devrun/wheels/pydantic*.whl \
        .devrun/wheels/annotated_types*.whl .devrun/wheels/typing_inspection*.whl
    export PYTHONPATH=/tmp/pydantic-wheels:$PWD PYTHONUNBUFFERED=1
    nvidia-smi -L || true
    python3 -m workers.gpu .devrun/job.json > "$out/gpu_result.json" 2> "$out/gpu_stderr.txt" || echo "exit $?"
    tail -c 2000 "$out/gpu_stderr.txt"
    python3 - "$out/gpu_result.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(r["status"], r["runtime"], r["top1"], r["latency_ms"], r["reason"][:800])
print("served:", r["extra"].get("shipped"), "fastest faithful:", r["extra"].get("fastest"))
for name, v in r["extra"]["variants"].items():
    print(name, v.get("runtime"), v.get("latency_ms"), v.get("parity"), v.get("error", "")[:400])
PY
    ;;
*) sed -n 2,16p "$0"; exit 2 ;;
esac
