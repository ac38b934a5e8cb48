# 2:4 semi-structured (cuSPARSELt) vs dense fp16 on a GPU, per-call time amortised over 20 calls.
# Results measured on an H200 are in benchmarks/h200_semi_structured_2to4.json.
import json, sys, time, warnings, torch
import torch.nn.functional as F
from torch.sparse import to_sparse_semi_structured, SparseSemiStructuredTensor
sys.path.insert(0, ".")  # run from the repository root: python3 scripts/gpu_explore_2to4.py OUT.json
from chapter11.nm import nm_mask
print(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0), torch.__version__, flush=True)
def per_call(fn, inner=20, outer=7):
    for _ in range(3): fn()
    torch.cuda.synchronize(); ts=[]
    for _ in range(outer):
        s,e=torch.cuda.Event(enable_timing=True),torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(inner): fn()
        e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e)/1e3/inner)
    ts.sort(); return ts[len(ts)//2]
rows=[]
for k in (4096, 8192, 16384):
    W=torch.randn(k,k,device="cuda",dtype=torch.float16); W=W*nm_mask(W)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore"); A=to_sparse_semi_structured(W)
    for b in (16, 1024, 8192):
        x=torch.randn(b,k,device="cuda",dtype=torch.float16)
        want=F.linear(x,W); got=F.linear(x,A)
        err=((got.float()-want.float()).abs().max()/want.float().abs().max()).item()
        d=per_call(lambda: F.linear(x,W)); s=per_call(lambda: F.linear(x,A))
        X=x.t().contiguous(); dm=per_call(lambda: torch.mm(W,X)); sm=per_call(lambda: torch.mm(A,X))
        r=dict(size=k,batch=b,err=err,dense_linear_s=d,sparse_linear_s=s,linear_speedup=d/s,dense_mm_s=dm,sparse_mm_s=sm,mm_speedup=dm/sm)
        rows.append(r); print(json.dumps({kk:(round(v,7) if isinstance(v,float) else v) for kk,v in r.items()}), flush=True)
json.dump(rows, open(sys.argv[1],"w"), indent=1)
