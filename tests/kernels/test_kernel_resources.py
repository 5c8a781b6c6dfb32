"""tools/kernel_resources.py: Triton kernels compiled for sm_90a on the CPU (triton's bundled ptxas), their
registers, spills and shared memory read from the cubin."""

import json
from pathlib import Path

import pytest

pytest.importorskip("triton")

from tools import kernel_resources as kr  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_programs_per_sm_by_hand():
    assert kr.programs_per_sm(168, 4, 40960) == 3  # registers: 65536 // (168 * 128)
    assert kr.programs_per_sm(86, 4, 24576) == 5  # 88 after rounding to 8: 65536 // (88 * 128)
    assert kr.programs_per_sm(32, 4, 64 * 1024) == 3  # shared memory: 228 KB // 64 KB
    assert kr.programs_per_sm(16, 32, 0) == 2  # threads: 2048 // 1024


def test_hsa_kernels_as_the_h200_built_them():
    """The shipped HSA kernels at their T=1024, l=64 configuration, compiled here, have the registers, spills and
    shared memory that triton 3.6 reported on the H200 for the same launches (session 23's `compiled` entry, every
    variant its sweep built): the divisibility hints make the difference (without them the band forward came out
    at 776 B of spills)."""
    on_gpu = json.loads((ROOT / "results/raw/h200-hsa-caps.json").read_text())["compiled"]
    # The unrolled band backward's GPU build was recorded as _band_bwd_short_kernel with EARLY = 0, the code that
    # _band_bwd_kernel's UNROLLED now holds (same registers and shared memory; it recorded no num_stages: 1).
    short = json.loads((ROOT / "results/raw/h200-hsa-band-bwd-short.json").read_text())["compiled"]
    on_gpu["band_bwd_kernel"] += [{k: v for k, v in e.items() if k != "EARLY"} | {"UNROLLED": True, "num_stages": 1}
                                  for e in short["band_bwd_short_kernel"] if e["EARLY"] == 0]  # fmt: skip
    rows = {r.kernel: r for r in kr.hsa_resources(1024, 64, 64, pdl=False)}  # the launches of session 23
    assert rows["_band_bwd_kernel"].constants["UNROLLED"]
    for name, got in rows.items():
        launch = {"num_warps": got.num_warps, "num_stages": got.num_stages, "maxnreg": got.maxnreg}
        consts = {k: v for k, v in got.constants.items() if k != "PDL"}
        (built,) = [e for e in on_gpu[name.strip("_")] if e.items() >= (consts | launch).items()]
        assert (got.registers, got.shared_bytes) == (built["n_regs"], built["shared"]), name
        assert (got.stack_bytes > 0) == (built["n_spills"] > 0), name
        if got.maxnreg is not None:
            assert got.registers <= got.maxnreg
    assert rows["_band_bwd_kernel"].programs_per_sm == 3 and rows["_strided_bwd_kernel"].programs_per_sm == 4


def test_loss_kernels_build_for_the_gpu_without_spills():
    """kernels/cross_entropy.py's kernels at their shipped settings compile for sm_90a (a module-level float that
    the interpreter accepted did not), spill nothing and leave several programs per SM to keep loads in flight."""
    rows = {r.kernel: r for r in kr.cross_entropy_resources()}
    assert set(rows) == {"_ce_fwd_kernel", "_ce_bwd_kernel"}
    for r in rows.values():
        assert r.stack_bytes == 0 and r.programs_per_sm >= 4, r


def test_a_compile_error_the_interpreter_would_not_see():
    """A loop-carried value that changes type runs under TRITON_INTERPRET (numpy does not care) but does not
    compile for a GPU: the CPU finds it here."""
    import triton
    import triton.language as tl

    @triton.jit
    def bad(X, N: tl.constexpr):
        acc = tl.zeros((N,), tl.float32)
        for _ in range(3):
            acc = tl.sum(acc[:, None] + tl.zeros((N, N), tl.float32), 1).to(tl.float16)
        tl.store(X + tl.arange(0, N), acc)

    with pytest.raises(Exception, match="[Ll]oop-carried"):
        kr.compile_resources(bad, {"X": "*fp16"}, {"N": 16}, {"num_warps": 4, "num_stages": 1})
