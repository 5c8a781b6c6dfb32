"""What a Triton kernel costs an SM, found on any machine: compiles it ahead of time for a GPU target (sm_90a by
default) with triton's bundled ptxas, no GPU needed, and reads the cubin's registers, stack (spills) and shared
memory, how many programs fit on one SM, and whether the software pipeliner issued async copies.

    python -m tools.kernel_resources            # the HSA kernels at their TUNED configurations and the loss kernels
    python -m tools.kernel_resources --json r.json

A register cap (Launch.maxnreg) that trades programs per SM for spills, or a loop the pipeliner left alone, shows here
before any GPU time is spent. The numbers are the compiler's; only a benchmark says what they cost.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import typer

SM_REGISTERS = 65536
SM_THREADS = 2048
SM_SHARED = 228 * 1024  # H100 / H200: 228 KB of shared memory per SM, up to 227 KB for one program


@dataclass(frozen=True)
class Resources:
    kernel: str
    constants: dict[str, Any]
    num_warps: int
    num_stages: int
    maxnreg: int | None
    registers: int
    stack_bytes: int  # per thread; mostly spills
    shared_bytes: int
    programs_per_sm: int
    async_copies: int  # async_copy_global_to_local ops in the TritonGPU IR: loads the pipeliner staged

    def row(self) -> str:
        consts = " ".join(f"{k}={v}" for k, v in self.constants.items())
        cap = f"cap {self.maxnreg}" if self.maxnreg else "no cap"
        return (f"{self.kernel:<22} {consts:<36} w{self.num_warps} s{self.num_stages} {cap:<8} "
                f"regs {self.registers:>3}  stack {self.stack_bytes:>5} B  smem {self.shared_bytes:>6} B  "
                f"{self.programs_per_sm} / SM  async copies {self.async_copies}")  # fmt: skip


def programs_per_sm(registers: int, num_warps: int, shared: int) -> int:
    """Programs one SM can hold by registers, threads and shared memory (registers are allocated per warp in
    units of 256, i.e. 8 a thread)."""
    threads = 32 * num_warps
    per_thread = -(-max(registers, 1) // 8) * 8
    by_regs = SM_REGISTERS // (per_thread * threads)
    by_shared = SM_SHARED // shared if shared else by_regs
    return min(by_regs, SM_THREADS // threads, by_shared)


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise RuntimeError(f"triton has no bundled {name} ({path}); this tool needs triton's NVIDIA backend")
    return str(path)


def compile_resources(
    fn: Any,
    signature: dict[str, str],
    constants: dict[str, Any],
    options: dict[str, int],
    arch: int = 90,
    divisible: frozenset[str] = frozenset(),
) -> Resources:
    """Compiles `fn` (a triton.jit function) for sm_<arch> and reads its resources. signature: every runtime
    argument's Triton type ("*bf16", "i32", "fp32", ...); constants: the constexpr arguments' values; options:
    num_warps, num_stages and optionally maxnreg; divisible: the arguments a launch would specialize as multiples
    of 16 (16-byte aligned pointers, integers divisible by 16), which decides how wide the loads are and so the
    registers: name them as the real launch's values would be."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {**signature, **dict.fromkeys(constants, "constexpr")}
    names = list(fn.arg_names)
    if unknown := set(sig) ^ set(names):
        raise ValueError(f"{fn.__name__}: signature and constants must name every argument; mismatch: {unknown}")
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    source = ASTSource(fn=fn, signature={n: sig[n] for n in names}, constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / f"{fn.__name__}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True)  # fmt: skip
    line = next((x for x in usage.stdout.splitlines() if "REG:" in x), None)
    if line is None:
        raise RuntimeError(f"cuobjdump printed no resource line for {fn.__name__}: {usage.stdout[-300:]}")
    field = lambda key: int(re.search(rf"{key}:(\d+)", line).group(1))  # noqa: E731
    regs, shared = field("REG"), compiled.metadata.shared
    return Resources(
        kernel=fn.__name__, constants=dict(constants), num_warps=options["num_warps"],
        num_stages=options.get("num_stages", 3), maxnreg=options.get("maxnreg"), registers=regs,
        stack_bytes=field("STACK"), shared_bytes=shared,
        programs_per_sm=programs_per_sm(regs, options["num_warps"], shared),
        async_copies=compiled.asm["ttgir"].count("async_copy_global_to_local"),
    )  # fmt: skip


def hsa_resources(T: int = 1024, stride: int = 64, head_dim: int = 64, arch: int = 90,
                  pdl: bool | None = None) -> list[Resources]:  # fmt: skip
    """The four HSA kernels at config_for(T, stride, head_dim), bf16, as the trainer launches them: programmatically
    dependent (`PDL`) from sm90 on, unless `pdl` says otherwise."""
    from kernels import hsa_attention as hsa

    cfg = hsa.config_for(T, stride, head_dim)
    np_ = hsa._periods(T, stride)
    p = {"PDL": arch >= 90 if pdl is None else pdl}
    kernels = [
        (hsa._strided_fwd_kernel, {"HEAD_DIM": head_dim, "NP": np_, "RS": cfg.strided_fwd.block // np_, **p},
         cfg.strided_fwd),
        (hsa._band_fwd_kernel, {"HEAD_DIM": head_dim, "BLOCK_M": cfg.band_fwd.block,
                                "BLOCK_N": cfg.band_fwd.block_n or cfg.band_fwd.block, **p}, cfg.band_fwd),
        (hsa._strided_bwd_kernel, {"HEAD_DIM": head_dim, "NP": np_, "RS": cfg.strided_bwd.block // np_, **p},
         cfg.strided_bwd),
        (hsa._band_bwd_kernel, {"HEAD_DIM": head_dim, "BLOCK": cfg.band_bwd.block, "UNROLLED": cfg.band_bwd.unrolled,
                                **p}, cfg.band_bwd),
    ]  # fmt: skip

    def arg_type(name: str) -> str:  # the kernels' naming: tensors capitalized, lse and delta fp32
        if name.startswith("stride") or name in ("H", "T", "L"):
            return "i32"
        return "fp32" if name.endswith("scale") else "*fp32" if name in ("LSE", "Delta") else "*bf16"

    # The trainer's q, k, v are views of c_attn's (B, T, 3 nh hs) output and o is (B, T, nh, hs): every stride is a
    # multiple of hs; T and l as given.
    def is_divisible(name: str) -> bool:
        if name.startswith("stride"):
            return head_dim % 16 == 0
        return arg_type(name).startswith("*") or {"T": T % 16 == 0, "L": stride % 16 == 0}.get(name, False)

    out = []
    for fn, consts, launch in kernels:
        sig = {name: arg_type(name) for name in fn.arg_names if name not in consts}
        divisible = frozenset(filter(is_divisible, sig))
        out.append(compile_resources(fn, sig, consts, launch.options(), arch, divisible))
    return out


def cross_entropy_resources(arch: int = 90) -> list[Resources]:
    """The loss kernels (kernels/cross_entropy.py) at their FWD_*/BWD_* settings, bf16 logits, int64 targets."""
    from kernels import cross_entropy as ce

    fp32, ints = ("Loss", "LSE", "Scale"), ("V", "ignore_index", "stride_x", "stride_dx")
    out = []
    for fn, block, warps in [(ce._ce_fwd_kernel, ce.FWD_BLOCK, ce.FWD_WARPS),
                             (ce._ce_bwd_kernel, ce.BWD_BLOCK, ce.BWD_WARPS)]:  # fmt: skip
        sig = {n: "i32" if n in ints else "*fp32" if n in fp32 else "*i64" if n == "Tgt" else "*bf16"
               for n in fn.arg_names if n != "BLOCK"}  # fmt: skip
        divisible = frozenset(n for n in sig if n != "ignore_index")  # 50304 and its row strides are multiples of 16
        out.append(compile_resources(fn, sig, {"BLOCK": block}, {"num_warps": warps, "num_stages": 3}, arch, divisible))
    return out


app = typer.Typer(add_completion=False)


@app.command()
def main(
    T: int = typer.Option(1024, "--T", help="Sequence length whose HSA configuration (TUNED or default) is compiled."),
    stride: int = typer.Option(64, help="HSA stride l."),
    head_dim: int = typer.Option(64, help="Head dimension."),
    arch: int = typer.Option(90, help="Compute capability to compile for (90: H100 / H200)."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the rows to this JSON file."),
) -> None:
    rows = hsa_resources(T, stride, head_dim, arch) + cross_entropy_resources(arch)
    for r in rows:
        print(r.row())
    if json_out is not None:
        json_out.write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    app()
