#!/usr/bin/env bash
# Remake the shipped models in pretrained/ from a fresh clone: the arith data, the target
# (python train.py), its 16-bit copy, the distillation of that copy (python train_cllm.py, as a
# user runs it), the CLLM's 16-bit copy, and the held-out table of the two on the 500 test
# prompts in their manifests. About 52 minutes on a 2-core CPU (docs/results.md). Run it after a change to model.py
# or to the arith data: tests/test_pretrained.py fails until the shipped files match again.
#
#     bash scripts/make_pretrained.sh                 # the runs go to out-pretrained/
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-out-pretrained}
rm -rf "$work"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
step() {  # step COMMAND...: run it, timed
  local t0=$SECONDS
  echo "=== $*"
  "$@"
  echo "=== $((SECONDS - t0)) s: $*"
}
step "$py" data/arith/prepare.py
step "$py" train.py --out_dir="$work/target"
step "$py" scripts/export_pretrained.py --src="$work/target" --dst=pretrained/arith-target \
  --made_by="python data/arith/prepare.py && python train.py --out_dir=$work/target"
step "$py" train_cllm.py --out_dir="$work/cllm"   # distils pretrained/arith-target, the default
step "$py" scripts/export_pretrained.py --src="$work/cllm" --dst=pretrained/arith-cllm \
  --made_by="python train_cllm.py --out_dir=$work/cllm"
step "$py" bench.py --model_dir=pretrained/arith-cllm --test_prompts=500 --blocks=2 --lookup \
  --json_out="$work/bench.json"
step "$py" scripts/export_pretrained.py --table="$work/bench.json"
