"""Reference log-probs computed once and kept on disk (safetensors), so DPO / KTO training never
loads the reference model while the cache exists.

    cache = RefLogpCache("runs/ref_logps.safetensors", fingerprint={"model": "llama-3-8b", "data": "v3"})
    if not cache.exists():
        cache.build(lambda batch: ref_logps_of(batch), loader)      # reference model loaded only here
    ref = cache.load()                                              # {"chosen": [N], "rejected": [N]}
    ref_chosen = ref["chosen"][batch["index"]]

Each stored tensor is indexed by the example's position in the dataset. The fingerprint (strings)
is stored in the file's metadata; loading with a different one raises, so a cache built for
another model or data set is never used by mistake. Files are written to a temporary name, flushed
to the disk (fsync) and moved into place (``os.replace``), so a crash never leaves a half-written
cache; a cache that is damaged anyway (truncated, empty, not safetensors) is a miss for
:meth:`RefLogpCache.load_or_build`, which rebuilds it, and a clear error for :meth:`RefLogpCache.load`.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

_FORMAT = "peftkern.ref_logps.v1"


def _as_metadata(fingerprint: dict | None) -> dict[str, str]:
    meta = {str(k): str(v) for k, v in (fingerprint or {}).items()}
    if "format" in meta:
        raise ValueError("RefLogpCache: 'format' is reserved in the fingerprint")
    return meta


class RefLogpCache:
    """A safetensors file of per-example reference log-probs: {name: fp32 [N]} plus a fingerprint."""

    def __init__(self, path: str | os.PathLike, fingerprint: dict | None = None):
        self.path = os.fspath(path)
        self.fingerprint = _as_metadata(fingerprint)

    def exists(self) -> bool:
        return os.path.isfile(self.path)

    def save(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write {name: [N]} atomically (fp32, contiguous, on the CPU)."""
        if not tensors:
            raise ValueError("RefLogpCache.save: nothing to save")
        lengths = {k: v.shape[0] if v.dim() else None for k, v in tensors.items()}
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or not t.is_floating_point():
                raise ValueError(f"RefLogpCache.save: {name!r} must be a 1-D float tensor, got "
                                 f"{getattr(t, 'shape', type(t).__name__)}")
        out = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".ref_logps.", suffix=".tmp", dir=directory)
        os.close(fd)
        try:
            save_file(out, tmp, metadata={"format": _FORMAT, **self.fingerprint,
                                          "lengths": ",".join(f"{k}={n}" for k, n in lengths.items())})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            mask = os.umask(0o022)
            os.umask(mask)
            os.chmod(tmp, 0o666 & ~mask)  # mkstemp made it 0600
            os.replace(tmp, self.path)
            _fsync_dir(directory)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def read(self, device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor] | None, str | None]:
        """(tensors, None), or (None, why not): ``"missing"``, ``"unreadable: ..."`` (truncated, empty,
        not safetensors), ``"foreign: ..."`` (not our format) or ``"fingerprint: ..."`` (built for other inputs)."""
        if not self.exists():
            return None, "missing"
        try:
            with safe_open(self.path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("format") != _FORMAT:
                    return None, f"foreign: {self.path} is not a peftkern reference log-prob cache"
                stored = {k: v for k, v in meta.items() if k not in ("format", "lengths")}
                if stored != self.fingerprint:
                    return None, f"fingerprint: {self.path} was built for {stored}, not {self.fingerprint}"
                tensors = {k: f.get_tensor(k).to(device) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for a damaged header
            return None, f"unreadable: {self.path} is truncated or corrupted ({type(exc).__name__}: {exc})"
        return tensors, None

    def load(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """{name: fp32 [N]}; raises if the file is missing, damaged, not ours, or has another fingerprint."""
        tensors, why = self.read(device)
        if why == "missing":
            raise FileNotFoundError(f"RefLogpCache: no cache at {self.path}")
        if why is not None:
            raise ValueError(f"RefLogpCache: {why.split(': ', 1)[1]}; delete it or build a new one")
        return tensors

    def build(self, compute: Callable[[object], dict[str, torch.Tensor]], batches: Iterable,
              indices: Callable[[object], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Run ``compute(batch) -> {name: [b]}`` under ``torch.no_grad()`` over ``batches`` and save.

        Results are concatenated in order, or scattered to ``indices(batch)`` (the batch's dataset
        positions, for shuffled or distributed loaders). Returns what was saved.
        """
        parts: dict[str, list] = {}
        positions: list[torch.Tensor] = []
        with torch.no_grad():
            for batch in batches:
                result = compute(batch)
                for name, values in result.items():
                    parts.setdefault(name, []).append(values.detach().to("cpu", torch.float32).reshape(-1))
                if indices is not None:
                    positions.append(torch.as_tensor(indices(batch)).to("cpu", torch.long).reshape(-1))
        if not parts:
            raise ValueError("RefLogpCache.build: no batches")
        tensors = {k: torch.cat(v) for k, v in parts.items()}
        if indices is not None:
            where = torch.cat(positions)
            size = int(where.max()) + 1
            if where.unique().numel() != where.numel():
                raise ValueError("RefLogpCache.build: an example index appears twice")
            for name, values in tensors.items():
                full = torch.full((size,), float("nan"))
                full[where] = values
                tensors[name] = full
        self.save(tensors)
        return tensors

    def load_or_build(self, compute, batches, indices=None, device="cpu") -> dict[str, torch.Tensor]:
        """:meth:`load` when the cache exists and is readable, else :meth:`build` (the only time
        ``compute`` runs). A damaged cache (truncated, empty) is rebuilt with a warning; one built for
        another fingerprint still raises."""
        tensors, why = self.read(device)
        if why is None:
            return tensors
        if why.startswith("unreadable"):
            warnings.warn(f"RefLogpCache: {why.split(': ', 1)[1]}; rebuilding it", RuntimeWarning, stacklevel=2)
        elif why != "missing":
            raise ValueError(f"RefLogpCache: {why.split(': ', 1)[1]}; delete it or build a new one")
        return {k: v.to(device) for k, v in self.build(compute, batches, indices).items()}


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
