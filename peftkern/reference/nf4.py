"""NF4 with double quantization, defined plainly in torch: the format every NF4 face is tested against.

The format is bitsandbytes' (docs/ARCHITECTURE.md "Numerics and formats"):

* W (any shape, n elements, row-major) is cut into flat blocks of ``blocksize`` elements (the
  last one may be short). Each block stores absmax = max |w| (fp32); each element stores the index
  of the NF4 code value nearest to w * (1 / absmax) (ties go to the lower code).
* Two 4-bit codes per byte, element 2i in the high nibble, 2i+1 in the low one: ``ceil(n / 2)``
  bytes, shape ``[ceil(n / 2), 1]`` as bitsandbytes keeps them.
* Double quantization: the fp32 absmax vector minus its mean ``offset`` is itself quantized in
  blocks of 256 to 8-bit indices into bitsandbytes' signed dynamic map, with an fp32 absmax per
  256 absmaxes. Those 8-bit indices are picked as bitsandbytes' CPU quantizer picks them: the
  scaled value is snapped to a 65536-point grid over [-1, 1] and each grid point maps to its
  nearest code (so a value within half a grid step of a midpoint can land one code over).
* Dequantization: code[idx] * absmax in fp32, rounded once to the output dtype; with double quant
  absmax = dynamic[q] * absmax2 + offset, in fp32, in that order.
"""
from __future__ import annotations

import functools

import torch

# The 16 NF4 values (quantiles of N(0, 1) scaled to [-1, 1], with an exact zero), as fp32.
NF4_CODE_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
_GRID_POINTS = 65536


@functools.lru_cache(maxsize=None)
def _nf4_code_cpu() -> torch.Tensor:
    return torch.tensor(NF4_CODE_VALUES, dtype=torch.float32)


_ON_DEVICE: dict = {}


def _cached_on(name: str, make, device) -> torch.Tensor:
    """``make()`` (a CPU table) copied to ``device`` once and kept: later calls return the same
    tensor, so no call after the first copies from the host (a blocking copy from pageable memory
    on a GPU, which would also break CUDA-graph capture). The returned table is read-only."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (name, device.type, device.index)
    table = _ON_DEVICE.get(key)
    if table is None:
        table = _ON_DEVICE[key] = make().to(device)
    return table


def nf4_code(device=None) -> torch.Tensor:
    """The 16 NF4 values, fp32 [16], sorted ascending: a fresh CPU copy without ``device``, else
    the cached read-only table on that device (copied there once per device)."""
    return _cached_on("nf4", _nf4_code_cpu, device) if device is not None else _nf4_code_cpu().clone()


@functools.lru_cache(maxsize=None)
def _dynamic_code_cpu() -> torch.Tensor:
    # Signed dynamic tree map (Dettmers 2016): for exponent e = 0..6 the 2^e + 1 evenly spaced
    # boundaries on [0.1, 1] give 2^e midpoints, scaled by 10^(e - 6), on both signs; then 0 and 1.
    values: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2 ** e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (e - 6)
        values += (scale * mids).tolist()
        values += (-scale * mids).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def dynamic_code(device=None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map, fp32 [256], sorted ascending (the second level of
    double quantization): a fresh CPU copy without ``device``, else the cached read-only table there."""
    return _cached_on("dynamic", _dynamic_code_cpu, device) if device is not None else _dynamic_code_cpu().clone()


@functools.lru_cache(maxsize=8)
def _grid_to_code(code_key: tuple) -> torch.Tensor:
    """For each of the 65536 grid points over [-1, 1], the index of the first code whose upper
    midpoint is not below it: int64 [65536]."""
    code = torch.tensor(code_key, dtype=torch.float32)
    mids = (code[:-1] + code[1:]) * 0.5
    grid = -1.0 + (2.0 * torch.arange(_GRID_POINTS, dtype=torch.float32)) / float(_GRID_POINTS - 1)
    return torch.searchsorted(mids, grid, side="left")


def _blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, int]:
    """flat [n] fp32 -> ([blocks, blocksize] zero-padded, n)."""
    n = flat.numel()
    pad = (-n) % blocksize
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize), n


def quantize_nf4_codes(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w (any shape, fp32/fp16/bf16) -> (packed uint8 [ceil(n/2), 1], absmax fp32 [ceil(n/bs)]).

    Full blocks scale by the reciprocal of their absmax; a short last block divides by its absmax
    floored at 1e-38 (and stores the floored value), exactly as bitsandbytes does.
    """
    flat = w.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    head = flat[:full].view(-1, blocksize)
    absmax = head.abs().amax(dim=1) if full else flat.new_zeros(0)
    scaled = (head * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, (flat[full:] / tail_max).clamp(-1, 1)])
    if n % 2:  # the unused low nibble of the last byte holds the code of 0.0, as bitsandbytes'
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    code = nf4_code(w.device)
    idx = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)
    packed = (idx[0::2] << 4) | idx[1::2]
    return packed.view(-1, 1), absmax


def quantize_blockwise_8bit(a: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """a fp32 [n] -> (uint8 indices into ``code`` [n], fp32 absmax per block), bitsandbytes' CPU
    rule: scaled = a * (1 / absmax), snapped to the 65536-point grid, grid point -> nearest code.
    A block whose absmax is 0 stores index 0 everywhere."""
    blocks, n = _blocks(a.reshape(-1).float(), blocksize)
    absmax = blocks.abs().amax(dim=1)
    inv = torch.where(absmax == 0, torch.zeros_like(absmax), 1.0 / absmax)
    scaled = (blocks * inv[:, None]).clamp(-1.0, 1.0)
    grid = ((scaled + 1.0) * 0.5 * float(_GRID_POINTS - 1) + 0.5).to(torch.int64)
    table = _grid_to_code(tuple(code.float().cpu().tolist())).to(a.device)
    q = table.index_select(0, grid.reshape(-1)).view(grid.shape).to(torch.uint8)
    q = torch.where((absmax == 0)[:, None], torch.zeros_like(q), q)
    return q.reshape(-1)[:n], absmax


def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """uint8 [n] -> fp32 [n]: code[q] * absmax[i // blocksize]."""
    block = torch.arange(q.numel(), device=q.device) // blocksize
    # index_select, not code[q]: advanced indexing into a tiny table is pathologically slow on the CPU
    return code.to(q.device).index_select(0, q.reshape(-1).long()) * absmax.index_select(0, block)


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 absmax [B] -> (quantized uint8 [B], nested absmax fp32 [ceil(B/256)], dynamic code
    fp32 [256], offset fp32 scalar tensor = mean(absmax))."""
    offset = absmax.mean()
    code = dynamic_code(absmax.device)
    q, nested = quantize_blockwise_8bit(absmax - offset, code, NESTED_BLOCKSIZE)
    return q, nested, code.clone(), offset  # a copy: each weight owns (and saves) its map


def decode_absmax(qabsmax: torch.Tensor, nested_absmax: torch.Tensor, nested_code: torch.Tensor,
                  offset: float | torch.Tensor, nested_blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    """The fp32 absmax of every NF4 block back from its double-quantized parts."""
    return dequantize_blockwise_8bit(qabsmax, nested_absmax, nested_code, nested_blocksize) + offset


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape, blocksize: int,
                   dtype: torch.dtype = torch.float32, chunk: int = 1 << 18) -> torch.Tensor:
    """packed uint8 [ceil(n/2), 1], fp32 absmax -> W of ``shape`` in ``dtype`` (computed in fp32,
    rounded once). Works through ``chunk`` elements (whole blocks) at a time, so the temporaries
    stay small beside the output."""
    shape = tuple(shape)
    n = 1
    for s in shape:
        n *= s
    out = torch.empty(n, dtype=dtype, device=packed.device)
    flat = packed.reshape(-1)
    code = nf4_code(packed.device)
    absmax = absmax.float()
    step = max(blocksize, chunk // blocksize * blocksize)
    for start in range(0, n, step):  # start is a multiple of the (even) blocksize: a byte boundary
        stop = min(n, start + step)
        length = stop - start
        part = flat[start // 2:(stop + 1) // 2]
        idx = torch.stack([part >> 4, part & 15], dim=1).reshape(-1)[:length].long()
        blocks = -(-length // blocksize)
        values = torch.nn.functional.pad(code.index_select(0, idx), (0, blocks * blocksize - length))
        first = start // blocksize
        values = values.view(blocks, blocksize) * absmax[first:first + blocks, None]
        out[start:stop] = values.reshape(-1)[:length].to(dtype)
    return out.view(shape)


def nf4_linear(x: torch.Tensor, weight_deq: torch.Tensor, bias: torch.Tensor | None = None,
               lora_A: torch.Tensor | None = None, lora_B: torch.Tensor | None = None, scaling: float = 0.0,
               keep_mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """QLoRA's forward defined on the dequantized weight: y = x W^T + b + s (drop(x) A^T) B^T with
    W = dequant(W4) [out, in] (already in x's dtype)."""
    y = x @ weight_deq.t()
    if bias is not None:
        y = y + bias
    if lora_A is not None:
        dropped = x if keep_mask is None else x * keep_mask / (1.0 - dropout_p)
        y = y + scaling * ((dropped @ lora_A.t()) @ lora_B.t())
    return y
