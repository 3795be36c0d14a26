#!/usr/bin/env bash
# The benchmarks that need a GPU (BENCHMARKS.md, "Accelerators"), as two groups that each fit in
# one ten-minute command on a GPU machine that is offline and has JAX and PyTorch installed:
#
#   bash research/gpu_benchmarks.sh prepare       # here, where pip reaches its registry
#   bash research/gpu_benchmarks.sh gpt [OUT]     # there: GPT-2 small, ours and PyTorch's
#   bash research/gpu_benchmarks.sh more [OUT]    # there: image model, shakespeare_char, remat
#
# `prepare` fills .bench/ (ignored by git; carry it to the machine) with wheels for Python 3.12
# of the packages such a machine's image lacks (ml-collections, grain with array-record and
# portpicker, tensorboardX), the MNIST test set from ../shared/data as IDX files (a TFDS dataset
# needs TensorFlow to be opened there, which the image lacks) and tiny-shakespeare. A group
# installs the wheels where .bench/whl exists; on a machine where `pip install -r
# requirements.txt` worked, skip `prepare` and give the data to the group with BENCH_DATA=DIR.
# GPT-2 small runs on random tokens (`--mock_data`): no corpus, no tokenizer training.
#
# Each run appends its JSON line to OUT/results.jsonl, as {"run": NAME, ...}, or {"run": NAME,
# "failed": EXIT_STATUS}, as soon as it ends, and what it prints to OUT/log.txt as it prints it:
# a command cut short keeps the runs that finished and the output of the one it cut. OUT
# defaults to $OUT. Profiles are written to /tmp (too many files to come back from a device
# call): their summary, printed, is in the log.
# GPT_ARGS and CHAR_ARGS add config overrides to the GPT-2 small and shakespeare_char runs and
# TORCH_DEVICE (default cuda) picks the reference's device: with tiny models and cpu, the groups
# run on a CPU as a check of this file.
set -uo pipefail
cd "$(dirname "$0")/.."
group=${1:?"usage: $0 prepare | gpt [OUT] | more [OUT]"}
BENCH=.bench

if [[ $group == prepare ]]; then
  set -e
  grep -qx '/.bench/' .git/info/exclude 2>/dev/null || echo '/.bench/' >> .git/info/exclude
  mkdir -p "$BENCH/whl" "$BENCH/data"
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$BENCH/whl" \
    ml-collections==1.1.0 grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 tensorboardX==2.6.5
  cp ../shared/data/t10k-*-ubyte.gz ../shared/data/tinyshakespeare.txt "$BENCH/data/"
  du -sh "$BENCH"
  exit 0
fi

out=${2:-${OUT:?"give OUT as the second argument or in the environment"}}
mkdir -p "$out"
data=${BENCH_DATA:-$BENCH/data}
if [[ -d $BENCH/whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/bench-site "$BENCH"/whl/*.whl || exit
  export PYTHONPATH=/tmp/bench-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
read -r -a gpt_args <<< "${GPT_ARGS:-}"
read -r -a char_args <<< "${CHAR_ARGS:-}"
device=${TORCH_DEVICE:-cuda}
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  python3 -c 'import sys, jax, flax, optax, orbax.checkpoint as o, torch
print(sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__, "optax",
      optax.__version__, "orbax", o.__version__, "torch", torch.__version__, jax.devices())'
} > "$out/versions.txt" 2>&1

# run NAME SECONDS COMMAND...: the command under a time limit, all it prints to the log as it
# prints it (a run cut short by the device call's own limit leaves its output there), its last
# line of standard output that starts with '{' (the JSON) to the results.
run() {
  local name=$1 limit=$2 status
  shift 2
  echo "=== $name: $*" | tee -a "$out/log.txt"
  timeout "$limit" "$@" 2>> "$out/log.txt" | tee -a "$out/log.txt" > "$out/stdout.txt"
  status=${PIPESTATUS[0]}
  grep '^{' "$out/stdout.txt" | tail -n 1 | python3 -c '
import json, sys
name, status = sys.argv[1], int(sys.argv[2])
try:
  result = json.loads(sys.stdin.read()) if status == 0 else {"failed": status}
except ValueError:
  result = {"failed": "no JSON line"}
print(json.dumps({"run": name, **result}))' "$name" "$status" | tee -a "$out/results.jsonl"
}

bench=(python3 -m research.benchmark)
gpt=(--config=experiments/gpt_small.py --mock_data "${gpt_args[@]}")
mnist=(--config.data.name=mnist_idx "--config.data.path=$data"
       '--config.data.train_split=test[:8000]' '--config.data.eval_split=test[8000:]')
shakespeare=(--config=experiments/shakespeare_char.py "--config.data.source=$data/tinyshakespeare.txt"
             "${char_args[@]}")

case $group in
  gpt)
    # The default (8 micro-batches of 64, layers unrolled, cuDNN attention) and nanoGPT's
    # model at the same 8 x 64; then cuBLAS for every GEMM; last (the profiler has not run on a
    # GPU here yet), the default again with its matmuls timed alone and a profile.
    run default 150 "${bench[@]}" "${gpt[@]}" --steps=6 --warmup=2
    run torch_8x64 200 python3 -m research.torch_reference --config=experiments/gpt_small.py \
      "${gpt_args[@]}" --vocab_size=50304 "--device=$device" --compile --steps=6 --warmup=2
    run no_triton_gemm 150 env XLA_FLAGS=--xla_gpu_enable_triton_gemm=false \
      "${bench[@]}" "${gpt[@]}" --steps=6 --warmup=2
    run default_floor_profile 240 "${bench[@]}" "${gpt[@]}" --steps=3 --warmup=2 --matmul_floor \
      --profile_dir=/tmp/prof
    ;;
  more)
    run remat_dots_4x128 240 "${bench[@]}" "${gpt[@]}" --config.grad_accum_steps=4 \
      --config.model.remat=dots --steps=6 --warmup=2
    run mnist_cnn_vs_torch 240 "${bench[@]}" --config=experiments/mnist_cnn.py "${mnist[@]}" \
      --steps=30 --warmup=5 --against_torch --rounds=1 "--torch_args=--device=$device"
    run mnist_cnn_float32_over_bf16 240 "${bench[@]}" --config=experiments/mnist_cnn.py \
      "${mnist[@]}" --config_b=experiments/mnist_cnn.py "${mnist[@]/#--config/--config_b}" \
      --config_b.model.dtype=float32 --steps=30 --warmup=5
    run shakespeare_char_vs_torch 240 "${bench[@]}" "${shakespeare[@]}" --steps=20 --warmup=3 \
      --against_torch --rounds=1 "--torch_args=--device=$device --compile"
    run shakespeare_char_profile 240 "${bench[@]}" "${shakespeare[@]}" --steps=10 --warmup=3 \
      --profile_dir=/tmp/prof_char
    ;;
  *) echo "unknown group $group: prepare, gpt or more" >&2; exit 2 ;;
esac
