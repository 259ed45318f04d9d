#!/usr/bin/env bash
# The whole run on one GPU, one command: the decoding tests on CUDA in float32, a larger arith
# target (bf16 autocast, torch.compile), its trajectories and distillation, and the held-out table
# in float32 and in bf16. Uses the machine's own python3 (torch 2.11 or newer, tiktoken, numpy,
# pytest); nothing is installed or downloaded.
#
#     bash scripts/gpu_run.sh              # results in out-gpu-run/: log.txt, steps.txt, the JSONs
#     bash scripts/gpu_run.sh out-h100     # results in out-h100/
#     bash scripts/gpu_run.sh --smoke      # the same steps and settings at toy sizes on a CPU, in
#                                          # out-gpu-run-smoke/: the device, the sizes, compile
#                                          # and which tests run differ
#
# The smoke run does not torch.compile: inductor would spend ~30 s of a CPU building C++ kernels
# that a GPU does not use (it builds Triton ones); tests/test_model.py checks instead that the
# model compiles in one graph and trains as the eager one.
#
# Time-boxed: every step prints its estimate, derived from its sizes, and runs under a limit of
# 5/4 of it. The estimates add up to about 8 minutes on one H100-class GPU and the limits to about
# 10; they are guesses, not measurements (no GPU has run this script yet): after a run, log.txt
# and steps.txt have each step's time, to correct the costs below. Results are written as they
# come: each step's output goes to log.txt line by line (the tests' summary, the target's and the
# CLLM's evaluations, the tables), steps.txt gets a line per finished step, and a step cut by its
# limit (timeout's SIGTERM) saves where it was (last.pt, or its finished trajectory batches), which
# the next steps use.
#
# Rerunnable: run it again with the same folder and it goes on. A step that finished is skipped; a
# training step that did not finish (cut by its limit, killed, failed) resumes from its last.pt,
# or starts afresh when it has none; every step that depends on a step that ran again runs again
# afresh. A failed step does not stop the run: what does not need it still runs. The exit status is
# 0 only when every step finished. For a run from scratch, give another folder.
set -uo pipefail
cd "$(dirname "$0")/.."
smoke=0
if [ "${1:-}" = "--smoke" ]; then smoke=1; shift; fi
mode=$([ $smoke = 1 ] && echo smoke || echo gpu)
out=${1:-$([ $smoke = 1 ] && echo out-gpu-run-smoke || echo out-gpu-run)}
mkdir -p "$out/done"
if [ -f "$out/mode" ] && [ "$(cat "$out/mode")" != "$mode" ]; then
  echo "error: $out holds a $(cat "$out/mode") run, not a $mode run: give another folder" >&2
  exit 2
fi
echo "$mode" > "$out/mode"
exec > >(tee -a "$out/log.txt") 2>&1  # appended: a rerun keeps the earlier attempts' lines
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
started="$(date -u '+%Y-%m-%d %H:%M:%S') UTC: bash scripts/gpu_run.sh"
started+=" $([ $smoke = 1 ] && echo '--smoke ')$out"
echo "=== $started"
echo "--- $started" >> "$out/steps.txt"

"$py" - <<'PY'
import platform, torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, GPU {gpu}")
PY

data="$out/arith"
tests=(tests/test_model.py tests/test_jacobi.py tests/test_decoders.py tests/test_device.py)
# the GPU run's settings, in both modes: the configs, bf16 autocast in training, no table at the
# end of the distillation (bench.py makes them), and a distillation of whatever target the time
# allowed (--force: the check before collection would refuse a toy or cut-short target); on the
# GPU, torch.compile of the target too (config/train_arith_gpu.py)
target=(config/train_arith_gpu.py --autocast=bfloat16)
cllm=(config/cllm_arith_gpu.py --autocast=bfloat16 --test_prompts=0 --force)
if [ $smoke = 1 ]; then  # toy sizes on the CPU
  dev=cpu
  # one thread: faster for toy models, and CPU bf16 kernels stall on two threads of a busy CPU
  export OMP_NUM_THREADS=1
  # toy size: two of the files, without the fuzz (the CPU suite runs them all)
  tests=(tests/test_jacobi.py tests/test_device.py)
  test_args=(-k "not fuzz")
  records=300
  prep=(--num_train=300 --num_val=10 --num_test=10)
  target_iters=20 target_eval=10 target_test=4
  target+=(--compile=False --n_layer=1 --n_head=2 --n_embd=32 --batch_size=8 --eval_iters=1
           --val_prompts=2)
  cllm_prompts=16 cllm_iters=4 cllm_eval=2
  cllm+=(--collect_batch=8 --batch_size=4 --val_prompts=2)
  bench_prompts=4
  # costs measured on a 2-core CPU (x86, torch 2.13) under load, with room to spare
  start_s=8 tests_s=30 data_us_per_record=20000 compile_s=0 target_ms_per_iter=300
  target_eval_s=1 decode_ms_per_prompt=200 traj_ms_per_prompt=100 cllm_ms_per_iter=400
  cllm_eval_s=2 bench_ms_per_prompt=3000
else
  dev=cuda
  test_args=()
  records=50000  # data/arith/prepare.py's default
  prep=()
  target_iters=1500 target_eval=500 target_test=100
  cllm_prompts=8000 cllm_iters=500 cllm_eval=250
  bench_prompts=120
  # guesses for one H100-class GPU, not measurements: the small models are launch-bound (a decode
  # forward ~1.5 ms), packing a distillation row is CPU work (~2 ms a row on a 2-core CPU)
  start_s=15 tests_s=60 data_us_per_record=300 compile_s=60 target_ms_per_iter=20
  target_eval_s=5 decode_ms_per_prompt=100 traj_ms_per_prompt=3 cllm_ms_per_iter=150
  cllm_eval_s=6 bench_ms_per_prompt=450
fi
target+=(--max_iters=$target_iters --eval_interval=$target_eval --test_prompts=$target_test)
cllm+=(--num_prompts=$cllm_prompts --max_iters=$cllm_iters --eval_interval=$cllm_eval)

# each step's estimate in seconds, from its sizes and the costs above
evals() { echo $(( ($1 + $2 - 1) / $2 + 1 )); }  # evaluations of a run of $1 steps, one every $2
est_tests=$tests_s
est_data=$(( start_s + records * data_us_per_record / 1000000 ))
est_target=$(( start_s + compile_s + target_iters * target_ms_per_iter / 1000
               + $(evals $target_iters $target_eval) * target_eval_s
               + target_test * decode_ms_per_prompt / 1000 ))
est_cllm=$(( start_s + cllm_prompts * traj_ms_per_prompt / 1000 + cllm_iters * cllm_ms_per_iter / 1000
             + $(evals $cllm_iters $cllm_eval) * cllm_eval_s ))
est_bench=$(( start_s + (bench_prompts + 2) * bench_ms_per_prompt / 1000 ))  # (+2: the warm-up)
total=$(( est_tests + est_data + est_target + est_cllm + 2 * est_bench ))
echo "=== estimates (seconds; limits 5/4 of them): tests $est_tests, data $est_data, target" \
     "$est_target, cllm $est_cllm, bench $est_bench x 2: $total in all, limits $(( total * 5 / 4 ))"
if [ $smoke = 0 ] && ! "$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "error: this torch sees no CUDA GPU; bash scripts/gpu_run.sh --smoke runs the steps on a CPU"
  exit 2
fi

failed=0
summary=()  # this invocation's lines of steps.txt
redo=0  # set once a step the later ones depend on has run in this invocation
step() {  # step NAME ESTIMATE COMMAND...: run it under a limit of 5/4 of its estimate
  local name=$1 est=$2 limit=$(( $2 * 5 / 4 )) t0=$SECONDS rc command
  shift 2
  printf -v command '%q ' "$@"
  echo "=== $name: estimate $est s, limit $limit s: $command"
  timeout --kill-after=10 "$limit" "$@" < /dev/null
  rc=$?
  local took=$(( SECONDS - t0 )) status=ok
  if [ $rc = 0 ]; then
    touch "$out/done/$name"
  elif [ $rc = 124 ] || [ $rc = 137 ]; then
    status="cut at its limit"; failed=1
  else
    status="failed (exit $rc)"; failed=1
  fi
  echo "=== $name: $status, $took s (estimate $est s)"
  summary+=("$name: $status, $took s (estimate $est s, limit $limit s)")
  echo "${summary[-1]}" >> "$out/steps.txt"
}

skip() {  # skip NAME WHY
  echo "=== $1: skipped, $2"
  summary+=("$1: skipped, $2")
  echo "${summary[-1]}" >> "$out/steps.txt"
}

train_step() {  # train_step NAME ESTIMATE SCRIPT ARGS...: done, resumed or started afresh
  local name=$1 est=$2 dir="$out/$1" how=()
  shift 2
  if [ $redo = 1 ]; then
    rm -rf "$dir" "$out/done/$name"  # made from an earlier version of its inputs
  fi
  if [ -f "$out/done/$name" ]; then
    skip "$name" "finished in an earlier run"
    return
  fi
  if [ -f "$dir/last.pt" ]; then
    how=(--init_from=resume)  # go on from where it stopped
  else
    rm -f "$dir/ckpt.pt"  # no last.pt: it never got past its first evaluation; trajectories stay
  fi
  redo=1
  step "$name" "$est" "$py" "$@" --out_dir="$dir" "${how[@]}"
}

if [ -f "$out/done/tests" ]; then
  skip tests "passed in an earlier run"
else
  step tests "$est_tests" "$py" -m pytest -q -p no:cacheprovider --device=$dev "${test_args[@]}" "${tests[@]}"
fi

if [ -f "$out/done/data" ]; then
  skip data "prepared in an earlier run"
else
  redo=1
  step data "$est_data" "$py" data/arith/prepare.py --name="$data" "${prep[@]}"
fi

if [ -f "$data/meta.json" ]; then
  train_step target "$est_target" train.py "${target[@]}" --dataset="$data" --device=$dev
else
  skip target "no dataset"
fi

if [ -f "$out/target/ckpt.pt" ]; then
  train_step cllm "$est_cllm" train_cllm.py "${cllm[@]}" --dataset="$data" \
    --target_dir="$out/target" --device=$dev
else
  skip cllm "no target ($out/target/ckpt.pt)"
fi
if [ -f "$out/cllm/results.json" ]; then  # (written at the end of a distillation)
  cp "$out/cllm/results.json" "$out/cllm_results.json"
else
  rm -f "$out/cllm_results.json"
fi

for dtype in float32 bfloat16; do
  name=bench_$dtype
  [ $redo = 1 ] && rm -f "$out/done/$name"
  if [ -f "$out/done/$name" ]; then
    skip $name "finished in an earlier run"
  elif [ -f "$out/cllm/ckpt.pt" ]; then
    rm -f "$out/$name.json"
    step $name "$est_bench" "$py" bench.py --model_dir="$out/cllm" --dtype=$dtype --blocks=2 --multiblock \
      --lookup --test_prompts=$bench_prompts --json_out="$out/$name.json" --device=$dev
  else
    skip $name "no CLLM ($out/cllm/ckpt.pt)"
  fi
done

echo "=== steps:"
printf '%s\n' "${summary[@]}"
echo "=== done: $out/log.txt, $out/steps.txt, $out/cllm_results.json, $out/bench_float32.json," \
     "$out/bench_bfloat16.json"
exit $failed
