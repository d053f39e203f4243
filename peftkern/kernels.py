"""Static check of every Triton kernel: compile each launchable config for sm_80 and sm_90 without
a GPU (``triton.compile(ASTSource, target=GPUTarget("cuda", cc, 32))``) and read registers, spills
(the cubin's STACK bytes, from Triton's bundled ``cuobjdump -res-usage``), shared memory and, on
sm_90, whether wgmma is used. ``peftkern kernels`` prints it; ``--op NAME`` keeps one op's kernels.

Run it with ``TRITON_INTERPRET`` unset: the interpreter replaces kernels with Python callables.
It needs only torch, triton (3.6 and 3.9 both compile the same specs; each row names the version)
and what ``import peftkern`` needs, so a second environment with another Triton can run it
(``make kernels36``, docs/kernels.md).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import multiprocessing
import os
import re
import subprocess
import tempfile

# Every op module that defines Triton kernels exposes ``triton_kernel_specs() -> list[KernelSpec]``.
OP_MODULES = (
    "peftkern.ops.lora",
    "peftkern.ops.logprobs",
    "peftkern.ops.adamw",
    "peftkern.ops.nf4",
    "peftkern.ops.dora",
    "peftkern.ops.ia3",
    "peftkern.ops.bottleneck",
    "peftkern.ops.multi_lora",
)

ARCHS = {"sm_80": 80, "sm_90": 90}


def op_names() -> list[str]:
    """The ``--op`` names: the last part of each module in OP_MODULES ("lora", "logprobs", ...)."""
    return [name.rsplit(".", 1)[-1] for name in OP_MODULES]


def modules_for(ops=None) -> tuple:
    """OP_MODULES, or only the modules of the named ops; an unknown name is an error naming the choices."""
    if not ops:
        return OP_MODULES
    known = dict(zip(op_names(), OP_MODULES))
    unknown = [op for op in ops if op not in known]
    if unknown:
        raise ValueError(f"unknown op {', '.join(map(repr, unknown))}; choose from {', '.join(known)}")
    return tuple(known[op] for op in ops)


@dataclasses.dataclass
class KernelReport:
    kernel: str
    config: str
    arch: str
    registers: int | None
    spill_bytes: int | None
    shared_bytes: int | None
    wgmma: bool | None
    ok: bool
    error: str = ""
    triton: str = ""

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not d["error"]:
            d.pop("error")
        return d


def all_specs(modules=None):
    """[(module name, index, KernelSpec)] for every Triton kernel config of every op (of ``modules``)."""
    found = []
    for name in modules or OP_MODULES:
        module = importlib.import_module(name)
        found.extend((name, i, spec) for i, spec in enumerate(module.triton_kernel_specs()))
    return found


def _compile_in_worker(module_name: str, index: int, arch: str) -> "KernelReport":
    spec = importlib.import_module(module_name).triton_kernel_specs()[index]
    return compile_spec(spec, arch)


def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else "cuobjdump"


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) of the one kernel in ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    if not regs or not stack:
        raise RuntimeError(f"cannot read cuobjdump -res-usage output: {out!r}")
    return int(regs.group(1)), int(stack.group(1))


def compile_spec(spec, arch: str) -> KernelReport:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import triton

    cc = ARCHS[arch]
    try:
        arg_index = spec.kernel.arg_names.index
        signature = {k: v for k, v in spec.signature.items() if k not in spec.unit_args}
        constexprs = dict(spec.constexprs)
        constexprs.update({arg: 1 for arg in spec.unit_args})
        attrs = {(arg_index(arg),): [["tt.divisibility", 16]] for arg, ty in signature.items()
                 if ty.startswith("*") or (ty.startswith("i") and arg not in spec.plain_args)}
        signature.update({k: "constexpr" for k in constexprs})
        src = ASTSource(fn=spec.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages, "enable_fp_fusion": True,
                   **getattr(spec, "options", {})}
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
        regs, stack = _resource_usage(compiled.asm["cubin"])
        wgmma = ("wgmma.mma_async" in compiled.asm["ptx"]) if cc >= 90 else None
        shared = getattr(compiled.metadata, "shared", None)
        return KernelReport(spec.name, spec.config, arch, regs, stack, shared, wgmma, ok=(stack == 0),
                            triton=triton.__version__)
    except Exception as exc:  # report, never hide: ok=False with the reason
        return KernelReport(spec.name, spec.config, arch, None, None, None, None, ok=False,
                            error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                            triton=_triton_version())


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


def report(archs=("sm_80", "sm_90"), jobs: int | None = None, ops=None) -> list[KernelReport]:
    """Compile every config (of the named ``ops``, default all) for every arch; ``jobs`` worker
    processes (default: the CPU count)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("peftkern kernels compiles for the GPU; unset TRITON_INTERPRET first")
    if not archs:
        raise ValueError(f"no arch given; choose from {', '.join(ARCHS)}")
    for arch in archs:
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    work = [(name, index, arch) for name, index, _ in all_specs(modules_for(ops)) for arch in archs]
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        return [_compile_in_worker(*item) for item in work]
    context = multiprocessing.get_context("spawn")  # a forked torch/triton process is not safe to reuse
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        return list(pool.map(_compile_in_worker, *zip(*work)))


def format_table(rows: list[KernelReport]) -> str:
    versions = sorted({r.triton for r in rows if r.triton})
    header = f"{'kernel':<28} {'config':<44} {'arch':<6} {'regs':>5} {'spill':>6} {'smem':>7} {'wgmma':>6}  ok"
    lines = [f"triton {', '.join(versions) or '?'}", header, "-" * len(header)]
    for r in rows:
        wg = "-" if r.wgmma is None else ("yes" if r.wgmma else "no")
        lines.append(f"{r.kernel:<28} {r.config:<44} {r.arch:<6} {r.registers if r.registers is not None else '?':>5} "
                     f"{r.spill_bytes if r.spill_bytes is not None else '?':>6} "
                     f"{r.shared_bytes if r.shared_bytes is not None else '?':>7} {wg:>6}  "
                     f"{'yes' if r.ok else 'NO ' + r.error}")
    return "\n".join(lines)
