"""Checkpoint files, one tensor at a time: read a transformers weight folder (``model.safetensors``,
sharded with ``model.safetensors.index.json``, or ``pytorch_model.bin`` through
``torch.load(weights_only=True, mmap=True)``) and write safetensors shards the way
``save_pretrained`` names them.

Reading maps the file, copies (or converts) the tensors asked for and unmaps it again, so the
pages of a tensor already consumed never stay in the process's resident memory: a loader that
quantizes each weight as it is read holds one 16-bit weight at a time, not the checkpoint.
``CheckpointReader.mapped`` instead hands out a safetensors tensor as it lies in the file (a
private copy-on-write mapping): a tensor the model keeps in its stored dtype costs no copy, its
pages are read when first used, and pages never used (an embedding's unused rows) never become
resident.
Every problem (no weights in the folder, an index naming a missing shard, a tensor the index
promises that its shard lacks, a damaged file) is a :class:`CheckpointFileError` naming the file
and the tensor.
"""
from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import shutil
import tempfile
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFE_INDEX, SAFE_SINGLE, BIN_INDEX, BIN_SINGLE)
_SAFE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class CheckpointFileError(ValueError):
    """A weight folder or file that cannot be read as asked; the message names the file and tensor."""


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is, read from the file header (no data read)."""
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int | None = None  # where its bytes start in a safetensors file

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def weight_files(directory: str) -> tuple[str, list[str]]:
    """(the file that lists the weights, the weight files) of a transformers folder: the safetensors
    index or single file first, then PyTorch's. Raises CheckpointFileError naming what was looked for."""
    for name in WEIGHT_FILES:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        if not name.endswith(".index.json"):
            return path, [path]
        index = _read_index(path)
        files = sorted({os.path.join(directory, f) for f in index.values()})
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            first = next(k for k, f in index.items() if os.path.join(directory, f) == missing[0])
            raise CheckpointFileError(f"{path} names the shard {os.path.basename(missing[0])} (for {first!r} and "
                                      f"others), which is not in {directory}")
        return path, files
    found = sorted(n for n in os.listdir(directory) if n.endswith((".safetensors", ".bin", ".pt", ".pth")))
    extra = f"; it has {', '.join(found[:4])}, not named as transformers names weights" if found else ""
    raise CheckpointFileError(f"{directory}: no model weights in it (looked for {', '.join(WEIGHT_FILES)}){extra}")


def _read_index(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointFileError(f"{path}: not a readable weight index ({exc})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointFileError(f"{path}: expected {{\"weight_map\": {{tensor name: shard file}}}}")
    return weight_map


class CheckpointReader:
    """The tensors of one weight folder, read on demand.

    ``names()`` lists them, ``info(name)`` gives file, dtype and shape from the headers, and
    ``read(names, convert)`` maps each file once, calls ``convert(name, tensor)`` on every tensor
    asked for (``tensor`` aliases the mapped file: ``convert`` must return new memory, e.g. a
    copy, a cast, a quantized weight or the tensor moved to a GPU) and unmaps the file before
    returning."""

    def __init__(self, directory: str):
        self.directory = directory
        self.listing, self.files = weight_files(directory)
        self.safetensors = self.files[0].endswith(".safetensors")
        self._maps: dict[str, mmap.mmap] = {}  # file -> its private mapping (``mapped``)
        self._info: dict[str, TensorInfo] = {}
        for path in self.files:
            for name, info in self._headers(path).items():
                self._info[name] = info
        if self.listing.endswith(".index.json"):
            index = _read_index(self.listing)
            for name, shard in index.items():
                info = self._info.get(name)
                if info is None or info.file != os.path.join(directory, shard):
                    raise CheckpointFileError(f"{self.listing} places {name!r} in {shard}, which does not hold it")

    def _headers(self, path: str) -> dict[str, TensorInfo]:
        if not self.safetensors:
            return {name: TensorInfo(path, t.dtype, tuple(t.shape)) for name, t in self._load_bin(path).items()}
        try:
            with safe_open(path, framework="pt") as f:  # checks the header against the file
                out = {}
                offsets = _data_offsets(path)
                for name in f.keys():
                    piece = f.get_slice(name)
                    out[name] = TensorInfo(path, _SAFE_DTYPES.get(piece.get_dtype(), torch.uint8),
                                           tuple(piece.get_shape()), offsets.get(name))
                return out
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointFileError(f"{path}: not a readable safetensors file ({exc})") from None

    @staticmethod
    def _load_bin(path: str) -> dict[str, torch.Tensor]:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # weights_only refuses anything but tensors and plain containers
            raise CheckpointFileError(f"{path}: cannot be read with torch.load(weights_only=True): {exc}") from None
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise CheckpointFileError(f"{path}: expected a dict of tensor name: tensor")
        return data

    def names(self) -> list[str]:
        return list(self._info)

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def info(self, name: str) -> TensorInfo:
        try:
            return self._info[name]
        except KeyError:
            raise CheckpointFileError(f"{self.directory}: no tensor {name!r} in {os.path.basename(self.listing)}") from None

    def read(self, names, convert=None) -> dict:
        """{name: convert(name, tensor)} for ``names`` (default convert: a copy), one file mapping
        at a time."""
        convert = convert or (lambda name, t: t.clone())
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.info(name).file, []).append(name)
        out = {}
        for path, wanted in by_file.items():
            with self._mapped(path) as get:
                for name in wanted:
                    out[name] = convert(name, get(name))
        return out

    def mapped(self, name: str) -> torch.Tensor | None:
        """The tensor ``name`` as it lies in its safetensors file: a view of a private copy-on-write
        mapping of the file (nothing read until used; writing to it copies only the pages written,
        never the file). The mapping lives as long as a tensor made from it. None where that is not
        possible (a PyTorch .bin checkpoint, bytes not aligned to the dtype, an empty tensor):
        ``read`` it instead."""
        info = self.info(name)
        size = torch.empty((), dtype=info.dtype).element_size()
        if not self.safetensors or info.offset is None or info.offset % size or info.numel == 0:
            return None
        mapping = self._maps.get(info.file)
        if mapping is None:
            try:
                with open(info.file, "rb") as f:
                    mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as exc:
                raise CheckpointFileError(f"{info.file}: cannot map it ({exc})") from None
            self._maps[info.file] = mapping
        if info.offset + info.nbytes > len(mapping):
            raise CheckpointFileError(f"{info.file}: tensor {name!r} runs past the end of the file")
        return torch.frombuffer(mapping, dtype=info.dtype, count=info.numel, offset=info.offset).view(info.shape)

    def close(self) -> None:
        """Drop the reader's own references to the files mapped by ``mapped`` (the tensors keep theirs)."""
        self._maps.clear()

    @contextlib.contextmanager
    def _mapped(self, path: str):
        if not self.safetensors:
            data = self._load_bin(path)
            try:
                yield data.__getitem__
            finally:
                del data
            return
        try:
            handle = safe_open(path, framework="pt")
        except (SafetensorError, OSError) as exc:
            raise CheckpointFileError(f"{path}: not a readable safetensors file ({exc})") from None
        with handle:
            def get(name):
                try:
                    return handle.get_tensor(name)
                except (SafetensorError, OSError) as exc:
                    raise CheckpointFileError(f"{path}: cannot read tensor {name!r} ({exc})") from None
            yield get


def _data_offsets(path: str) -> dict[str, int]:
    """{tensor name: the file offset of its first byte} from a safetensors header (an 8-byte
    little-endian header length, the JSON header, then the data its ``data_offsets`` index)."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    return {name: 8 + length + int(meta["data_offsets"][0]) for name, meta in header.items() if name != "__metadata__"}


# -- writing -------------------------------------------------------------------------------------
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text) -> int:
    """``"5GB"`` -> 5 * 10**9, ``"500MiB"`` -> 500 * 2**20, ``1000`` -> 1000 (bytes; as transformers'
    ``max_shard_size``)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise ValueError(f"size {text!r}: expected a number of bytes with an optional unit (500MB, 2GB, 1GiB)")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return value


class ShardWriter:
    """Write tensors into safetensors shards of at most ``max_shard_bytes`` each (a tensor larger
    than that gets a shard of its own), named as ``save_pretrained`` names them: one file
    ``model.safetensors``, or ``model-00001-of-0000N.safetensors`` plus
    ``model.safetensors.index.json``. Only the current shard's tensors are held in memory."""

    def __init__(self, directory: str, max_shard_bytes: int = 5 * 10**9):
        self.directory, self.max = directory, int(max_shard_bytes)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[str, list[str]]] = []  # (temp file, names)
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.pending or any(name in names for _, names in self.written):
            raise ValueError(f"tensor {name!r} written twice")
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max:
            self._flush()
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        path = os.path.join(self.directory, f".tmp-shard-{len(self.written):05d}.safetensors")
        save_file(self.pending, path, metadata={"format": "pt"})
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, give every shard its final name and write the index; returns the
        files' names."""
        if self.pending or not self.written:
            self._flush()
        count = len(self.written)
        if count == 1:
            os.replace(self.written[0][0], os.path.join(self.directory, SAFE_SINGLE))
            return [SAFE_SINGLE]
        weight_map, names = {}, []
        for i, (tmp, keys) in enumerate(self.written):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(tmp, os.path.join(self.directory, final))
            weight_map.update({k: final for k in keys})
            names.append(final)
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(self.directory, SAFE_INDEX), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
        return names + [SAFE_INDEX]


@contextlib.contextmanager
def staged_directory(out_dir: str):
    """A temporary folder beside ``out_dir`` to write a whole checkpoint into; on success it
    replaces ``out_dir`` (which must not exist or be empty), on failure it is removed: a
    reader never sees half a checkpoint, and nothing already at ``out_dir`` is lost."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise CheckpointFileError(f"{out_dir} exists and is not an empty folder; choose a new output folder")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(out_dir)}-", dir=parent)
    try:
        yield tmp
        _usual_modes(tmp)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _usual_modes(directory: str) -> None:
    """The modes a plain ``mkdir`` / ``open`` give under the process's umask (a temporary folder and
    safetensors' files are created private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            os.chmod(path, 0o666 & ~umask)


def copy_side_files(model_dir: str, out_dir: str) -> list[str]:
    """Copy what a model folder holds besides weights and config.json (tokenizer, generation config,
    chat template); returns the names copied."""
    copied = []
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if (os.path.isfile(path) and name != "config.json" and not name.startswith(".")
                and not name.endswith((".safetensors", ".bin", ".pt", ".pth", ".index.json"))):
            shutil.copy2(path, os.path.join(out_dir, name))
            copied.append(name)
    return copied
