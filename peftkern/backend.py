"""Which face of an op runs: ``"torch"`` (the reference or a faster torch path), ``"triton"`` or ``"cuda"``.

    with peftkern.backend.use("triton"):
        y = peftkern.ops.lora_linear(x, w, None, a, b, 2.0)

The choice comes from, in order: ``use(...)`` (innermost wins), the environment variable
``PEFTKERN_BACKEND``, else ``"auto"``. Auto picks the fastest face the op has for the tensors'
device: CUDA C++ where the op has one and its kernels load and run on that GPU (probed once per
device, see ``_cuda.why_unavailable``), then Triton, on a GPU; torch on the CPU. Asking for a face
that cannot run raises :class:`BackendUnavailable` with the reason; ``peftkern info`` prints each
face's reason.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os

import torch

from peftkern import _cuda

FACES = ("torch", "triton", "cuda")
CHOICES = ("auto",) + FACES

_choice: contextvars.ContextVar[str | None] = contextvars.ContextVar("peftkern_backend", default=None)


class BackendUnavailable(RuntimeError):
    """A face was asked for that cannot run here (the message says why)."""


def _validate(name: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"peftkern backend must be one of {CHOICES}, got {name!r}")
    return name


@contextlib.contextmanager
def use(name: str):
    """Run the enclosed ops with face ``name`` ("auto", "torch", "triton" or "cuda")."""
    token = _choice.set(_validate(name))
    try:
        yield
    finally:
        _choice.reset(token)


def current() -> str:
    """The face asked for now: the innermost ``use``, else ``PEFTKERN_BACKEND``, else ``"auto"``."""
    name = _choice.get()
    if name is not None:
        return name
    env = os.environ.get("PEFTKERN_BACKEND", "").strip().lower()
    if env:
        try:
            return _validate(env)
        except ValueError as exc:
            raise ValueError(f"environment variable PEFTKERN_BACKEND: {exc}") from None
    return "auto"


def triton_interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_importable() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton)"
    return None


def _cuda_present() -> bool:
    return torch.cuda.is_available()


def why_unavailable(face: str, device_type: str = "cuda", device_index: int | None = None) -> str | None:
    """None if ``face`` can run on tensors of ``device_type``, else the reason it cannot.

    For the CUDA C++ face on "cuda" this loads the kernels on ``device_index`` (default: the current
    device) and launches a probe kernel there, once per device (cached): a fatbin without code for
    this GPU, a driver too old for it or a cuda-python that cannot talk to the driver reads as
    unavailable, with the cause.
    """
    _validate(face)
    if face == "torch":
        return None
    if face == "triton":
        missing = _triton_importable()
        if missing:
            return missing
        if device_type == "cuda":
            return None if _cuda_present() else "no CUDA device is visible to torch"
        if triton_interpreting():
            return None
        return (f"Triton kernels need CUDA tensors; these are on {device_type!r} "
                "(set TRITON_INTERPRET=1 before importing peftkern to run them in Triton's CPU interpreter)")
    # cuda
    if device_type != "cuda":
        return f"the CUDA C++ face needs CUDA tensors; these are on {device_type!r}"
    if not _cuda_present():
        return "no CUDA device is visible to torch"
    return _cuda.why_unavailable(device_index)


def available(device_type: str | None = None) -> dict[str, bool]:
    """Which faces can run, for ``device_type`` ("cuda" if a GPU is visible, else "cpu")."""
    if device_type is None:
        device_type = "cuda" if _cuda_present() else "cpu"
    return {face: why_unavailable(face, device_type) is None for face in FACES}


@torch.compiler.assume_constant_result
def pick(op_name: str, op_faces: tuple[str, ...], device_type: str, device_index: int | None = None) -> str:
    """The face ``op_name`` runs with for tensors on ``device_type`` (device ``device_index``, default
    the current one, for the CUDA C++ probe).

    Under ``torch.compile`` the face is decided when the graph is traced and fixed in it.

    ``op_faces`` lists the faces the op has, fastest last. An explicit choice the op lacks, or one
    that cannot run here, raises :class:`BackendUnavailable`; auto never raises.
    """
    choice = current()
    if choice == "auto":
        if device_type != "cuda":
            return "torch"
        for face in reversed(op_faces):
            if why_unavailable(face, device_type, device_index) is None:
                return face
        return "torch"
    if choice not in op_faces:
        raise BackendUnavailable(f"{op_name} has no {choice!r} face (it has: {', '.join(op_faces)})")
    reason = why_unavailable(choice, device_type, device_index)
    if reason is not None:
        raise BackendUnavailable(f"{op_name}: the {choice!r} face cannot run: {reason}")
    return choice
