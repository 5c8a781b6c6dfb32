"""Session 30 probe: does Triton 3.6's warp-specialized loop (`tl.range(..., warp_specialize=True)`) run on this
GPU, and which feature of `_bsr_mm_kernel`'s loop makes it hang (session 28: it hung on its first launch)? Each
variant runs in a subprocess of its own under a timeout, so a hang costs seconds and is recorded as one. The kernel
is a 128x128-tile C = A @ Wᵀ through TMA descriptors, built up to the block-sparse loop one feature at a time:
  plain    K loop 0..K (K = 1024), constant bounds
  bounds   the loop's bounds loaded from memory (a list's start and end)
  index    plus the A column and the W row taken from an index list inside the loop (as the forward's idx / blk)
  flat     plus the flat (block, 64-wide chunk) walk of `_bsr_mm_kernel` (t // S, t % S)
each with and without warp specialization at 4 warps, and without at 8 (compiled for sm90, Triton 3.6 specializes
the loop at 4 warps only, and fails to compile it with a TMA descriptor store after the loop, so every variant
stores through pointers). Timed as the median of 50 launches (CUDA events);
checked against torch.

    PYTHONPATH=. python results/raw/h200-ws-probe-s30.py
"""

import json
import os
import subprocess
import sys
import time

import triton
import triton.language as tl

VARIANTS = ("plain", "bounds", "index", "flat")
M, N, K, B = 16384, 4096, 1024, 128


@triton.jit
def kernel(
    a_desc, w_desc, c_desc, c_ptr, span_ptr, idx_ptr, NJ, K: tl.constexpr, VARIANT: tl.constexpr, WS: tl.constexpr,
    TMA_STORE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    pid_m, j = pid // NJ, pid % NJ
    acc = tl.zeros((BM, BN), tl.float32)
    if VARIANT == "plain":
        for k in tl.range(0, K, BK, warp_specialize=WS):
            acc = tl.dot(a_desc.load([pid_m * BM, k]), w_desc.load([j * BN, k]).T, acc)
    elif VARIANT == "bounds":
        start, end = tl.load(span_ptr + 2 * j), tl.load(span_ptr + 2 * j + 1)
        for k in tl.range(start, end, BK, warp_specialize=WS):
            acc = tl.dot(a_desc.load([pid_m * BM, k]), w_desc.load([j * BN, k]).T, acc)
    elif VARIANT == "index":  # chunks of BK = the block: one chunk a list entry
        start, end = tl.load(span_ptr + 2 * j), tl.load(span_ptr + 2 * j + 1)
        for p in tl.range(start, end, warp_specialize=WS):
            kb = tl.load(idx_ptr + p)
            acc = tl.dot(a_desc.load([pid_m * BM, kb * BK]), w_desc.load([p * BN, 0]).T, acc)
    else:  # flat: (entry, chunk) pairs, 2 chunks of 64 a 128-wide block
        S: tl.constexpr = 128 // BK
        start, end = tl.load(span_ptr + 2 * j), tl.load(span_ptr + 2 * j + 1)
        for t in tl.range(start * S, end * S, warp_specialize=WS):
            p = t // S
            kk = (t % S) * BK
            kb = tl.load(idx_ptr + p)
            acc = tl.dot(a_desc.load([pid_m * BM, kb * 128 + kk]), w_desc.load([p * BN, kk]).T, acc)
    if TMA_STORE:
        c_desc.store([pid_m * BM, j * BN], acc.to(tl.bfloat16))
    else:  # Triton 3.6's warp specialization fails to compile a descriptor store after the loop (at 4 warps)
        rows, cols = pid_m * BM + tl.arange(0, BM), j * BN + tl.arange(0, BN)
        tl.store(c_ptr + rows.to(tl.int64)[:, None] * (NJ * BN) + cols[None, :], acc.to(tl.bfloat16))



def child(variant: str, ws: bool, warps: int) -> dict:
    import torch
    from triton.tools.tensor_descriptor import TensorDescriptor

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(M, K, generator=gen).cuda().bfloat16()
    nj = N // B
    bk = 128 if variant == "index" else 64
    if variant in ("plain", "bounds"):
        w = (torch.randn(N, K, generator=gen) / 32).cuda().bfloat16()
        span = torch.tensor([[0, K]] * nj, dtype=torch.int32).cuda()
        idx = torch.zeros(1, dtype=torch.int32, device="cuda")
        want = a.float() @ w.float().T
    else:  # 2 of the 8 column blocks per output block (75% block sparsity), packed W rows per entry
        cols = torch.stack([torch.randperm(K // 128, generator=gen)[:2].sort().values for _ in range(nj)])
        idx = cols.flatten().to(torch.int32).cuda()
        span = torch.tensor([[2 * jj, 2 * jj + 2] for jj in range(nj)], dtype=torch.int32).cuda()
        w = (torch.randn(2 * nj * 128, 128, generator=gen) / 16).cuda().bfloat16()  # entry p: packed rows p·128..
        want = torch.empty(M, N, device="cuda")
        for jj in range(nj):
            acc = torch.zeros(M, 128, device="cuda")
            for e, c in enumerate(cols[jj].tolist()):
                acc += a[:, c * 128 : (c + 1) * 128].float() @ w[(2 * jj + e) * 128 :][:128].float().T
            want[:, jj * 128 : (jj + 1) * 128] = acc
    c = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    a_d = TensorDescriptor(a, list(a.shape), list(a.stride()), [128, bk])
    w_d = TensorDescriptor(w, list(w.shape), list(w.stride()), [128, bk])
    c_d = TensorDescriptor(c, list(c.shape), list(c.stride()), [128, 128])
    launch = lambda: kernel[(M // 128 * nj,)](a_d, w_d, c_d, c, span, idx, nj, K=K, VARIANT=variant, WS=ws,
                                             TMA_STORE=False, BM=128, BN=128, BK=bk, num_warps=warps,
                                             num_stages=3)  # fmt: skip
    t0 = time.time()
    launch()
    torch.cuda.synchronize()
    first_s = time.time() - t0
    err = ((c.float() - want).abs().max() / want.abs().max()).item()
    times = []
    for _ in range(50):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        launch()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return {"status": "ok", "first_call_s": first_s, "ms": times[len(times) // 2], "rel_err": err}


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print("RESULT " + json.dumps(child(sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]))), flush=True)
        sys.exit(0)
    import torch

    res = {"method": "mst (block-sparse forward loop, warp-specialization probe)",
           "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "command": "PYTHONPATH=. python results/raw/h200-ws-probe-s30.py",
           "config": {"M": M, "N": N, "K": K, "tile": "128x128", "num_stages": 3, "timeout_s": 45},
           "rows": []}  # fmt: skip
    res["triton"] = triton.__version__
    for variant in VARIANTS:
        for warps, ws in ((4, False), (4, True), (8, False)):  # at 8 warps Triton 3.6 does not specialize the loop
            row = {"variant": variant, "warps": warps, "warp_specialize": ws}
            t0 = time.time()
            try:
                cmd = [sys.executable, __file__, variant, str(int(ws)), str(warps)]
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=45)
                line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
                row |= json.loads(line[7:]) if line else {"status": "error", "stderr": p.stderr[-600:]}
            except subprocess.TimeoutExpired:
                row["status"] = "timeout (hang)"
            row["wall_s"] = time.time() - t0
            res["rows"].append(row)
            print(row, flush=True)
            with open(os.path.join(os.environ.get("OUT", "."), "h200-ws-probe-s30.json"), "w") as f:
                json.dump(res, f, indent=1)
