#!/usr/bin/env bash
# One command for a GPU machine (H200, Python 3.12, JAX 0.11 with CUDA, no msgspec, no network):
# the kernel tests (LoRA and paged attention) against the real Pallas backend (Triton), the kernel
# and model benchmarks, then (with msgspec carried as a cp312 wheel in .whl/, e.g.
# `pip download msgspec --python-version 3.12 --only-binary=:all: -d .whl`) the serving
# benchmarks and the engine through the attention kernel.
# About 14 minutes; logs and the benchmark JSON go to OUT_DIR (default $OUT, else /tmp/gpu_check).
#   bash scripts/gpu_check.sh [OUT_DIR]
# JAX_PLATFORMS and LORA_JAX_TEST_BACKEND can be overridden to rehearse it on a CPU
# (JAX_PLATFORMS=cpu LORA_JAX_TEST_BACKEND=pallas_interpret).
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out_dir"
python=${PYTHON:-python3}

# Nothing can be fetched there: install carried wheels (msgspec for the rest of the suite) if any.
shopt -s nullglob
wheels=(.whl/*.whl)
if ((${#wheels[@]})); then
  "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/lora_jax_site \
    "${wheels[@]}" && export PYTHONPATH=/tmp/lora_jax_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
export LORA_JAX_TEST_BACKEND=${LORA_JAX_TEST_BACKEND:-pallas}
export PYTHONUNBUFFERED=1

"$python" -c "import jax; print('jax', jax.__version__, jax.devices())" || exit 1

status=0
# --noconftest: tests/conftest.py belongs to the whole suite (its fixtures may need msgspec or a
# model); the kernel tests need only tests/helpers, hence tests/ on the path. Highest matmul
# precision: on a GPU, XLA's float32 matmuls (the reference and dense backends) would otherwise
# use TF32, far from 1e-5.
PYTHONPATH=$PWD/tests:$PYTHONPATH JAX_DEFAULT_MATMUL_PRECISION=highest timeout 420 \
  "$python" -m pytest -q -p no:cacheprovider --noconftest --durations=5 \
  tests/kernels/test_kernels.py tests/kernels/test_kernels_grouping.py \
  tests/kernels/test_kernels_export.py tests/kernels/test_paged_attention.py \
  2>&1 | tee "$out_dir/kernel_tests.log" || status=1
bench_args=()
[ "$JAX_PLATFORMS" = cuda ] || bench_args=(--reduced)
timeout 180 "$python" scripts/bench_kernels.py ${bench_args[@]+"${bench_args[@]}"} \
  >"$out_dir/bench_kernels.json" 2>"$out_dir/bench_kernels.err" || status=1
cat "$out_dir/bench_kernels.json"
tail -n 5 "$out_dir/bench_kernels.err"
# One decode step of the bench model with and without 8 adapters, in both dtypes.
for dtype in float32 bfloat16; do
  timeout 120 "$python" scripts/bench_model.py --rounds 5 --dtype "$dtype" \
    >>"$out_dir/bench_model.json" 2>>"$out_dir/bench_model.err" || status=1
done
cat "$out_dir/bench_model.json"
# The serving benchmark needs msgspec (carry its cp312 wheel in .whl/, see the device README):
# bench model, 32 requests, 1/8/32 adapters through 8 slots, against the same without adapters.
if "$python" -c "import msgspec, tqdm" 2>/dev/null && [ "$JAX_PLATFORMS" = cuda ]; then
  timeout 240 "$python" scripts/benchmark.py --num-adapters 1 8 32 --max-loras 8 \
    --compare-base --bench-dir /tmp/lora_jax_bench --json-out "$out_dir/bench_serving.json" \
    >"$out_dir/bench_serving.log" 2>&1 || status=1
  head -n 5 "$out_dir/bench_serving.log"
  # The ragged step through the Pallas paged-attention kernel serves what the XLA path serves.
  LORA_JAX_TEST_BACKEND=pallas timeout 300 "$python" -m pytest -q -p no:cacheprovider \
    tests/engine/test_paged_engine.py -k ragged_attention_kernel \
    2>&1 | tee "$out_dir/engine_kernel_tests.log" || status=1
  # The windowed, soft-capped kernel (Gemma 2, Mistral, Qwen2, Phi-3 sliding layers) through
  # the engine on GPU (the kernel is the default there) against transformers + PEFT.
  timeout 300 "$python" -m pytest -q -p no:cacheprovider tests/models/test_families.py \
    -k float32 2>&1 | tee "$out_dir/families_kernel_tests.log" || status=1
  # End to end on Llama-3-8B's layer shapes (random weights; 8 of its 32 layers to fit the
  # device budget: every layer is the same work): 64 requests over 32 rank-16 adapters through
  # 8 slots, bf16, against the same engine without LoRA. Start-up compile counts are in the JSON.
  timeout 420 "$python" scripts/benchmark.py --model-shape llama3-8b --num-layers 8 \
    --num-adapters 32 --num-requests 64 --rank 16 --max-loras 8 --max-num-seqs 64 \
    --prompt-len 128 --output-len 64 --max-model-len 1024 --dtype bfloat16 --compare-base \
    --bench-dir /tmp/lora_jax_bench --json-out "$out_dir/bench_llama3_8b.json" \
    >"$out_dir/bench_llama3_8b.log" 2>&1 || status=1
  head -n 5 "$out_dir/bench_llama3_8b.log"
  # A slot fill costs one adapter's bytes at 8, 64 and 256 slots (ms per fill, JSON).
  timeout 120 "$python" scripts/bench_adapter_loads.py fill --slots 8 64 256 --dtype bfloat16 \
    --target-modules all --rank 16 >"$out_dir/bench_fill.json" 2>"$out_dir/bench_fill.err" \
    || status=1
  cat "$out_dir/bench_fill.json"
  # Slots cost memory, not time: one adapter through the Pallas kernels with max_loras 8, 64
  # and 256 (bench model, bf16), the same requests each time; the summary prints each
  # throughput against max_loras 8, the compilations after start-up (must be 0) and the
  # start-up's warm runs (lora_jax/worker/warm.py) with their seconds.
  for slots in 8 64 256; do
    timeout 240 "$python" scripts/benchmark.py --num-adapters 1 --max-loras "$slots" \
      --num-requests 64 --max-num-seqs 64 --dtype bfloat16 --bench-dir /tmp/lora_jax_bench \
      --json-out "$out_dir/bench_slots_$slots.json" >"$out_dir/bench_slots_$slots.log" 2>&1 \
      || status=1
  done
  "$python" - "$out_dir" <<'PY' || status=1
import json, sys
runs = {s: json.load(open(f"{sys.argv[1]}/bench_slots_{s}.json"))["runs"][0] for s in (8, 64, 256)}
for s, r in runs.items():
    ratio = r["tokens_per_s"] / runs[8]["tokens_per_s"]
    print(f"max_loras {s}: {r['tokens_per_s']} tok/s, {ratio:.3f}x of max_loras 8, "
          f"compilations after warm-up {r['compilations_after_warmup']}, start-up warm runs "
          f"{r['start_up'].get('warm_runs')} in {r['start_up'].get('warm_seconds')} s")
sys.exit(any(r["compilations_after_warmup"] for r in runs.values()))
PY
else
  echo "serving benchmark skipped: msgspec/tqdm not importable (carry their wheels in .whl/)"
fi
# Tensor parallelism: TP = 1 on a one-device mesh against the unsplit path (one GPU), and the
# serving benchmark split over every GPU when there are several. Needs msgspec like the above.
if "$python" -c "import msgspec, tqdm" 2>/dev/null; then
  PYTHONPATH=$PWD/tests:$PYTHONPATH JAX_DEFAULT_MATMUL_PRECISION=highest \
    LORA_JAX_COMPILE_ON_START=0 LORA_JAX_COMPILATION_CACHE_DIR= timeout 300 \
    "$python" -m pytest -q -p no:cacheprovider --noconftest tests/worker/test_one_device_mesh.py \
    2>&1 | tee "$out_dir/tp_tests.log" || status=1
  gpus=$("$python" -c "import jax; print(len(jax.devices()))")
  if [ "$JAX_PLATFORMS" = cuda ] && [ "$gpus" -gt 1 ]; then
    # The split model through the Pallas kernels under shard_map (the GPU default backends):
    # gqa's reference tokens at TP = 1, 2 and (with 4 GPUs or more) 4; one JSON line.
    sizes="[1, 2$([ "$gpus" -ge 4 ] && echo ", 4")]"
    JAX_DEFAULT_MATMUL_PRECISION=highest LORA_JAX_COMPILE_ON_START=0 \
      PYTHONPATH=$PWD/tests:$PYTHONPATH timeout 300 "$python" tests/helpers/tensor_parallel_run.py \
      "{\"sizes\": $sizes, \"num_kv_blocks\": 10, \"compile_on_start\": false, \"max_tokens\": 8, \"rounds\": 1}" \
      >"$out_dir/tp_gqa.json" 2>"$out_dir/tp_gqa.err" || status=1
    "$python" - "$out_dir/tp_gqa.json" <<'PY' || status=1
import json, sys
runs = {k: v for k, v in json.load(open(sys.argv[1])).items() if k != "errors"}
bad = [(size, o["case"]) for size, r in runs.items() for o in r["rounds"][0]
       if o["tokens"] != o["reference"]]
print(f"tp gqa: tokens differ from the reference: {bad}" if bad else
      f"tp gqa: the reference tokens at sizes {list(runs)}")
sys.exit(1 if bad else 0)
PY
    timeout 300 "$python" scripts/benchmark.py --num-adapters 8 --max-loras 8 \
      --tensor-parallel-size 1 "$gpus" --bench-dir /tmp/lora_jax_bench \
      --json-out "$out_dir/bench_tp.json" >"$out_dir/bench_tp.log" 2>&1 || status=1
    head -n 4 "$out_dir/bench_tp.log"
    # Decode tokens/s of Llama-3-8B's shapes (8 of its 32 layers, bf16) split over every GPU
    # against one GPU.
    timeout 420 "$python" scripts/benchmark.py --model-shape llama3-8b --num-layers 8 \
      --num-adapters 8 --num-requests 64 --rank 16 --max-loras 8 --max-num-seqs 64 \
      --prompt-len 128 --output-len 64 --max-model-len 1024 --dtype bfloat16 \
      --tensor-parallel-size 1 "$gpus" --bench-dir /tmp/lora_jax_bench \
      --json-out "$out_dir/bench_tp_llama3_8b.json" >"$out_dir/bench_tp_llama3_8b.log" 2>&1 \
      || status=1
    head -n 4 "$out_dir/bench_tp_llama3_8b.log"
  fi
else
  echo "tensor-parallel check skipped: msgspec/tqdm not importable (carry their wheels in .whl/)"
fi
echo "gpu_check: $([ $status = 0 ] && echo PASS || echo FAIL)"
exit $status
