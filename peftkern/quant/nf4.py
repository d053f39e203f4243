"""NF4Weight: a 4-bit NF4 weight in bitsandbytes' exact format, with optional double quantization.

    w4 = peftkern.quant.quantize_nf4(w, blocksize=64, double_quant=True)
    w4.dequantize(torch.bfloat16)          # [out, in] back, through the fastest face
    w4.bits_per_param                      # 4.127 at blocksize 64 with double quant
    w4.to_bnb()                            # the dict bitsandbytes serializes (QuantState.as_dict(packed=True))
    NF4Weight.from_bnb(packed, quant_state_dict)

The format is defined in :mod:`peftkern.reference.nf4`.
"""
from __future__ import annotations

import dataclasses
import json
import math

import torch

from peftkern.ops.nf4 import nf4_dequantize
from peftkern.reference import nf4 as ref

QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"


@dataclasses.dataclass
class NF4Weight:
    """A quantized weight.

    ``packed``: uint8 [ceil(n/2), 1], two codes per byte, first element in the high nibble.
    ``absmax``: fp32 [blocks] without double quant; uint8 [blocks] (indices into ``nested_code``)
    with it. ``nested_absmax``: fp32 [ceil(blocks/256)]; ``nested_code``: fp32 [256] (the dynamic
    map); ``offset``: the mean the nested values are taken about. ``shape`` and ``dtype`` are the
    original weight's.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: float | None = None
    nested_blocksize: int = ref.NESTED_BLOCKSIZE

    # -- facts ---------------------------------------------------------------------------------
    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes stored: codes, statistics (the 256-entry nested code counted once per weight)."""
        total = self.packed.numel() + self.absmax.numel() * self.absmax.element_size() + 4  # + offset
        if self.double_quant:
            total += self.nested_absmax.numel() * 4 + self.nested_code.numel() * 4
        return total

    @property
    def bits_per_param(self) -> float:
        """Storage bits per parameter of the codes and per-block statistics: 4 + 32/blocksize, or with
        double quant 4 + 8/blocksize + 32/(blocksize*256) (4.127 at blocksize 64). Shared tables
        (the 16 NF4 values, the 256-entry dynamic map) and the one offset are not per-parameter."""
        stats = self.absmax.numel() * self.absmax.element_size() * 8
        if self.double_quant:
            stats += self.nested_absmax.numel() * 32
        return (self.packed.numel() * 8 + stats) / max(1, self.numel)

    def absmax_fp32(self) -> torch.Tensor:
        """fp32 [blocks]: the per-block absmax, decoded from the double-quantized parts when needed."""
        if not self.double_quant:
            return self.absmax
        return ref.decode_absmax(self.absmax, self.nested_absmax, self.nested_code, self.offset, self.nested_blocksize)

    # -- use -----------------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W back, of ``shape``, in ``dtype`` (default: the original dtype), computed in fp32 and
        rounded once; through the fastest face for the device (torch, Triton, CUDA C++)."""
        return nf4_dequantize(self, dtype or self.dtype)

    def to(self, device) -> "NF4Weight":
        def move(t):
            return t.to(device) if t is not None else None

        return dataclasses.replace(self, packed=move(self.packed), absmax=move(self.absmax),
                                   nested_absmax=move(self.nested_absmax), nested_code=move(self.nested_code))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (those present)."""
        named = {"packed": self.packed, "absmax": self.absmax, "nested_absmax": self.nested_absmax,
                 "nested_code": self.nested_code}
        return {k: v for k, v in named.items() if v is not None}

    def __repr__(self) -> str:
        dq = "double_quant, " if self.double_quant else ""
        return (f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, {dq}"
                f"{self.bits_per_param:.3f} bits/param, device={self.device})")

    # -- bitsandbytes interop ------------------------------------------------------------------
    def to_bnb(self) -> dict[str, torch.Tensor]:
        """The dict bitsandbytes' ``QuantState.as_dict(packed=True)`` gives for this weight (the
        packed codes themselves are ``self.packed``): tensors plus the JSON of the non-tensor fields
        as a uint8 tensor under ``quant_state.bitsandbytes__nf4``."""
        out = {"absmax": self.absmax, "quant_map": ref.nf4_code(self.device).clone()}
        fields = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": _dtype_name(self.dtype),
                  "shape": list(self.shape)}
        if self.double_quant:
            out["nested_absmax"] = self.nested_absmax
            out["nested_quant_map"] = self.nested_code.clone()
            fields.update({"nested_blocksize": self.nested_blocksize, "nested_dtype": "float32",
                           "nested_offset": float(self.offset)})
        out[QUANT_STATE_KEY] = torch.tensor(list(json.dumps(fields).encode("utf-8")), dtype=torch.uint8)
        return out

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state, shape=None) -> "NF4Weight":
        """From bitsandbytes: ``packed`` uint8 codes and either a ``QuantState``, the dict of
        ``QuantState.as_dict(packed=True)`` (keys may carry a module prefix such as ``weight.``, as
        in a saved state dict) or of ``as_dict(packed=False)``. ``shape`` overrides the stored one."""
        if hasattr(quant_state, "as_dict"):
            quant_state = quant_state.as_dict(packed=False)
        fields, tensors = _split_bnb_dict(quant_state)
        if fields.get("quant_type") != "nf4":
            raise ValueError(f"from_bnb: only NF4 is supported, this state has quant_type={fields.get('quant_type')!r}")
        blocksize = int(fields["blocksize"])
        if blocksize not in ref.BLOCKSIZES:
            raise ValueError(f"from_bnb: blocksize {blocksize} is not one of {ref.BLOCKSIZES}")
        shape = torch.Size(shape if shape is not None else fields["shape"])
        dtype = getattr(torch, fields["dtype"])
        if packed.dtype != torch.uint8:
            packed = packed.view(torch.uint8)
        packed = packed.reshape(-1, 1)
        n = math.prod(shape)
        if packed.numel() != (n + 1) // 2:
            raise ValueError(f"from_bnb: {packed.numel()} packed bytes do not hold shape {tuple(shape)} "
                             f"({(n + 1) // 2} expected)")
        blocks = -(-n // blocksize)
        absmax = tensors["absmax"]
        if absmax.numel() != blocks:
            raise ValueError(f"from_bnb: absmax has {absmax.numel()} entries, {blocks} blocks expected")
        if "nested_absmax" not in tensors:
            return cls(packed, absmax.float(), shape, dtype, blocksize)
        nested_bs = int(fields.get("nested_blocksize", ref.NESTED_BLOCKSIZE))
        if nested_bs & (nested_bs - 1):
            raise ValueError(f"from_bnb: nested_blocksize {nested_bs} is not a power of two")
        offset = fields["nested_offset"]
        offset = float(offset.item() if isinstance(offset, torch.Tensor) else offset)
        return cls(packed, absmax.to(torch.uint8), shape, dtype, blocksize, tensors["nested_absmax"].float(),
                   tensors["nested_quant_map"].float(), offset, nested_bs)

    def to_bnb_quant_state(self):
        """A live ``bitsandbytes.functional.QuantState`` (imports bitsandbytes)."""
        try:
            from bitsandbytes.functional import QuantState
        except ImportError as exc:
            raise ImportError(f"to_bnb_quant_state needs bitsandbytes ({exc})") from exc
        return QuantState.from_dict(self.to_bnb(), device=self.device)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


def _split_bnb_dict(state: dict) -> tuple[dict, dict]:
    """bnb state dict (packed or not, maybe prefixed) -> (non-tensor fields, tensors by short name)."""
    fields: dict = {}
    tensors: dict = {}
    for key, value in state.items():
        if key.endswith("bitsandbytes__nf4") or key.endswith("bitsandbytes__fp4"):
            fields.update(json.loads(bytes(value.cpu().to(torch.uint8).tolist()).decode("utf-8")))
            continue
        short = key.split(".")[-1]
        if isinstance(value, torch.Tensor) and short in ("absmax", "quant_map", "nested_absmax", "nested_quant_map"):
            tensors[short] = value
        elif short == "nested_offset" and isinstance(value, torch.Tensor):
            fields[short] = value
        else:
            fields[short] = value
    if "absmax" not in tensors or "quant_type" not in fields:
        raise ValueError("from_bnb: the quant state needs 'absmax' and the quant_state.bitsandbytes__nf4 entry "
                         f"(or unpacked quant_type/blocksize/dtype/shape); got keys {sorted(state)}")
    return fields, tensors


def check_weight(w: torch.Tensor, blocksize: int, where: str = "quantize_nf4") -> None:
    """Bad input to quantization: not a tensor, not a float dtype, empty, non-finite, or a blocksize
    bitsandbytes does not have."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{where}: weight has dtype {w.dtype}; NF4 quantizes float32, float16 or bfloat16")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in ref.BLOCKSIZES:
        raise ValueError(f"{where}: blocksize must be one of {ref.BLOCKSIZES}, got {blocksize!r}")
    if w.numel() == 0:
        raise ValueError(f"{where}: weight of shape {tuple(w.shape)} is empty")
    finite = torch.isfinite(w)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        value = w[tuple(bad)].item()
        raise ValueError(f"{where}: weight has non-finite values ({int((~finite).sum())} of them, first {value} "
                         f"at index {tuple(bad)}); NF4 cannot represent NaN or inf")


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """w (any shape, fp32/fp16/bf16, finite) -> NF4Weight, byte-for-byte what
    ``bitsandbytes.functional.quantize_4bit(w, blocksize, quant_type="nf4",
    compress_statistics=double_quant)`` gives on the CPU."""
    check_weight(w, blocksize)
    with torch.no_grad():
        packed, absmax = ref.quantize_nf4_codes(w.detach(), blocksize)
        if not double_quant:
            return NF4Weight(packed, absmax, torch.Size(w.shape), w.dtype, blocksize)
        q, nested, code, offset = ref.double_quantize(absmax)
    return NF4Weight(packed, q, torch.Size(w.shape), w.dtype, blocksize, nested, code, float(offset.item()))
