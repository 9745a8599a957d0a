#!/usr/bin/env bash
# The GPU checks in one go: the suite's CUDA paths (tests/test_cuda_paths.py), then every benchmark
# that has a CUDA path, with --device cuda. Each part has its own time limit so one slow part
# cannot take the others' time; every log lands in OUT_DIR.
#
#     benchmarks/cuda_checks.sh [OUT_DIR]
set -u
out=${1:-cuda-checks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false

part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  grep -v -e "Loading weights" -e "Writing model shards" "$out/$name.txt" | tail -n 25
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, '| transformers',
transformers.__version__, '| peft', peft.__version__, '| cuda', torch.version.cuda)"

part cuda_tests 180 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda_paths.py
part finetune_throughput 120 python3 benchmarks/finetune_throughput.py --device cuda \
  --shape bert-base --steps 150 --repeat 2
part trap2_step_time 45 python3 benchmarks/trap2_step_time.py --device cuda --steps 30 --bf16
part image_throughput 45 python3 benchmarks/image_throughput.py --device cuda
part weightwatch_cost 45 python3 benchmarks/weightwatch_cost.py --device cuda --repeats 20
part aga_layer_time 75 python3 benchmarks/aga_layer_time.py --device cuda
