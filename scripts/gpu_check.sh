#!/usr/bin/env bash
# GPU check for issue 8 (CSR / N:M), meant for one run on a lent H100/H200.
# Runs the cuda-marked tests, then times 2:4 semi-structured vs dense fp16 and
# CUDA CSR vs dense fp32, printing ratios and writing JSON under $OUT.
# Then runs the CSR tests and the CPU sparse benchmark on the host's CPU (CPU_CHECK=0 skips them).
# Usage from the repo root: OUT=/some/dir bash scripts/gpu_check.sh   (about 5 minutes)
set -euo pipefail
OUT="${OUT:-build/gpu_check}"
mkdir -p "$OUT"
PY="${PY:-.venv/bin/python}"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
timeout 120 "$PY" -m pytest -q -m cuda tests/test_nm.py tests/test_csr.py -p no:cacheprovider -rs 2>&1 | tee "$OUT/cuda_tests.txt" || echo "cuda tests failed or timed out (see $OUT/cuda_tests.txt)"
# The CPU kernels on this host's CPU too (another CPU model, more cores): all CSR tests, then the CPU benchmark.
if [ "${CPU_CHECK:-1}" = 1 ]; then
  timeout 150 "$PY" -m pytest -q tests/test_csr.py -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/csr_tests.txt" || echo "CSR tests failed or timed out"
  OPENBLAS_THREAD_TIMEOUT=4 timeout 150 "$PY" -m chapter11.bench sparse --json "$OUT/bench_sparse_cpu.json" --plot "$OUT/bench_sparse_cpu.png" 2>&1 | tee "$OUT/bench_sparse_cpu.txt" || echo "CPU benchmark failed or timed out"
fi
timeout 120 "$PY" - "$OUT" <<'PYEOF'
import json, sys, torch
from chapter11.nm import gpu_skip_reason, semi_structured_benchmark, cuda_csr_benchmark
from chapter11.report import atomic_write_text
out = sys.argv[1]
reason = gpu_skip_reason()
result = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "torch": torch.__version__, "skip_reason": reason}
if reason is None:
    for batch in (16, 4096):
        for backend in (None, "cutlass"):
            try:
                rows = semi_structured_benchmark(sizes=(2048, 4096, 8192), batch=batch, repeats=20, backend=backend)
            except Exception as e:  # report, do not hide
                rows = [{"error": f"{type(e).__name__}: {e}", "batch": batch, "backend": backend}]
            result.setdefault("semi_structured", []).extend(rows)
            for r in rows:
                print("2:4 fp16" if "error" not in r else "2:4 ERROR", json.dumps(r))
if torch.cuda.is_available():
    rows = cuda_csr_benchmark(size=4096, sparsities=(0.5, 0.9, 0.95, 0.99), batches=(1, 32), repeats=20)
    result["cuda_csr"] = rows
    for r in rows:
        print(f"CUDA CSR s={r['sparsity']} batch={r['batch']}: dense {r['dense_s']*1e6:.1f} us, csr {r['csr_s']*1e6:.1f} us, speedup {r['speedup']:.2f}x")
atomic_write_text(json.dumps(result, indent=1), f"{out}/gpu_bench.json")
print("wrote", f"{out}/gpu_bench.json")
PYEOF
