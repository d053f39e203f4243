"""The ``peftkern`` command: info, kernels, demo and the trainers' subcommands.

Each subcommand is a function ``_cmd_<name>(args)`` with its parser built in ``_parser()``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys


def _cmd_info(args) -> int:
    import torch

    import peftkern
    from peftkern import _cuda, backend

    lines = [
        f"peftkern      {peftkern.__version__}",
        f"python        {platform.python_version()} ({platform.machine()})",
        f"torch         {torch.__version__}",
    ]
    for name in ("triton", "transformers", "safetensors", "cuda.core", "peft", "bitsandbytes", "trl", "liger_kernel"):
        lines.append(f"{name:<13} {_version_of(name)}")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    lines.append(f"gpu           {gpu}")
    lines.append(f"fatbin        {'present: ' + _cuda.FATBIN_PATH if _cuda.fatbin_present() else 'absent'}")
    try:
        from peftkern import _host  # noqa: F401

        host = "built"
    except ImportError as exc:
        host = f"absent ({exc})"
    lines.append(f"host twin     {host}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lines.append(f"backend       {backend.current()} (PEFTKERN_BACKEND / peftkern.backend.use)")
    for face in backend.FACES:
        reason = backend.why_unavailable(face, device)
        lines.append(f"  face {face:<7} {'available' if reason is None else 'unavailable: ' + reason}")
    print("\n".join(lines))
    return 0


def _version_of(module_name: str) -> str:
    import importlib
    import importlib.metadata

    dist = {"cuda.core": "cuda-core", "liger_kernel": "liger-kernel"}.get(module_name, module_name)
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        try:
            return getattr(importlib.import_module(module_name), "__version__", "installed")
        except Exception:
            return "not installed"


def _cmd_kernels(args) -> int:
    from peftkern import kernels

    archs = tuple(a.strip() for a in args.arch.split(",") if a.strip())
    rows = kernels.report(archs, jobs=args.jobs)
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=1))
    else:
        print(kernels.format_table(rows))
    return 0 if all(r.ok for r in rows) else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftkern", description="Fused PEFT kernels: info, static kernel report, "
                                     "demo and trainers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="versions, faces available, GPU, fatbin")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("kernels", help="compile every Triton kernel for sm_80/sm_90 and report registers, "
                       "spills, shared memory, wgmma")
    p.add_argument("--arch", default="sm_80,sm_90", help="comma-separated archs (default: sm_80,sm_90)")
    p.add_argument("--json", action="store_true", help="print a JSON list of objects "
                   "(kernel, config, arch, registers, spill_bytes, shared_bytes, wgmma, ok)")
    p.add_argument("--jobs", type=int, default=1, help="parallel compile threads (default 1)")
    p.set_defaults(func=_cmd_kernels)

    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
