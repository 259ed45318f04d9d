#!/usr/bin/env bash
# The whole run on one GPU, one command: the decoding tests on CUDA in float32, a larger arith
# target, its trajectories and distillation, and the held-out table in float32 and in bf16.
# Sized to finish in about 8 minutes on one H100-class GPU (an estimate: not yet run on one).
# Uses the machine's own python3 (torch 2.11 or newer, tiktoken, numpy, pytest); nothing is
# installed or downloaded.
#
#     bash scripts/gpu_run.sh                  # results in gpu-run/ (log.txt and the JSON files)
#     bash scripts/gpu_run.sh out-h100         # results in out-h100/
#     bash scripts/gpu_run.sh --smoke          # the same steps on a CPU at toy sizes (seconds)
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=0
if [ "${1:-}" = "--smoke" ]; then smoke=1; shift; fi
out=${1:-gpu-run}
mkdir -p "$out"
exec > >(tee "$out/log.txt") 2>&1
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

step() {  # step NAME COMMAND...: run it, timed
  local name=$1 t0=$SECONDS
  shift
  echo "=== $name: $*"
  "$@"
  echo "=== $name: $((SECONDS - t0)) s"
}

"$py" - <<'PY'
import platform, torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, GPU {gpu}")
PY

if [ "$smoke" = 1 ]; then  # toy sizes on the CPU: the same steps and files, in seconds
  data="$out/arith"
  dev=(--device=cpu)
  prep=(--name="$data" --num_train=300 --num_val=10 --num_test=10)
  target=(--n_layer=1 --n_head=2 --n_embd=32 --batch_size=8 --max_iters=20 --eval_interval=10
          --eval_iters=1 --val_prompts=2 --test_prompts=4 --compile=False)
  cllm=(--num_prompts=16 --collect_batch=8 --batch_size=4 --max_iters=4 --eval_interval=2
        --val_prompts=2 --test_prompts=4 --compile=False)
  bench=(--test_prompts=4)
  echo "=== tests: skipped in --smoke (the CPU suite runs them)"
else
  data=arith
  dev=(--device=cuda)
  prep=()
  target=()
  cllm=()
  bench=(--test_prompts=500)
  step tests "$py" -m pytest -q -p no:cacheprovider --device=cuda tests/test_model.py \
    tests/test_jacobi.py tests/test_decoders.py
fi

step data "$py" data/arith/prepare.py "${prep[@]}"
step target "$py" train.py config/train_arith_gpu.py --dataset="$data" --out_dir="$out/target" \
  "${dev[@]}" "${target[@]}"
step cllm "$py" train_cllm.py config/cllm_arith_gpu.py --dataset="$data" \
  --target_dir="$out/target" --out_dir="$out/cllm" "${dev[@]}" "${cllm[@]}"
for dtype in float32 bfloat16; do
  step "bench $dtype" "$py" bench.py --cllm_dir="$out/cllm" --dtype=$dtype --blocks=2 --lookup \
    --json_out="$out/bench_$dtype.json" "${dev[@]}" "${bench[@]}"
done
cp "$out/cllm/results.json" "$out/cllm_results.json"
echo "=== done: $out/log.txt, $out/cllm_results.json, $out/bench_float32.json, $out/bench_bfloat16.json"
