"""A transformers causal LM from a local folder, one tensor at a time.

The model is built from ``config.json`` with its parameters on the meta device; then every
tensor is read from the weight files (memory-mapped, one file mapping at a time), cast to the
run's dtype (or quantized to NF4, on the GPU when there is one) and put in place before the next
is read. On the CPU, a safetensors tensor already in the run's dtype is not copied at all: the
model keeps it as it lies in the file (a private copy-on-write mapping), so its pages are read
when first used and pages never used (an embedding's unused rows) cost no memory. Peak host
memory is therefore at most the loaded model plus one tensor: the 16-bit model for
``--dtype bf16``, the NF4 model (4-bit linears, 16-bit embeddings and head) for ``--quant nf4``.
A checkpoint already in bitsandbytes' 4-bit layout (written by ``peftkern quantize`` or by
transformers + bitsandbytes) loads its stored codes as NF4Linear layers, no requantization.
"""
from __future__ import annotations

import torch
from torch import nn

from peftkern.nn import NF4Linear
from peftkern.quant import layout
from peftkern.quant.shards import CheckpointFileError, CheckpointReader
from peftkern.quant.streaming import QUANT_STATE_KEY, key_map, missing_parameters, quantize_sliced, read_nf4, tied_keys

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class DtypeError(ValueError):
    """A dtype the device cannot run."""


def check_dtype_runs(dtype: torch.dtype, device: torch.device, flag: str = "--dtype") -> None:
    """Raise DtypeError unless ``device`` computes in ``dtype`` (a bf16 request on a GPU without
    bf16, or any dtype whose matmul the device's torch build refuses)."""
    name = DTYPE_NAMES.get(dtype, str(dtype))
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        major, minor = torch.cuda.get_device_capability(device)
        raise DtypeError(f"{flag} {name}: {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) "
                         "has no bf16 arithmetic; use --dtype fp16 or fp32")
    try:
        probe = torch.ones(2, 2, dtype=dtype, device=device)
        (probe @ probe).sum().item()
    except RuntimeError as exc:
        raise DtypeError(f"{flag} {name}: the {device.type} device cannot compute in it ({str(exc).splitlines()[0]})") \
            from None


def stored_dtype(reader: CheckpointReader) -> torch.dtype | None:
    """The floating dtype most of the checkpoint's bytes are stored in (4-bit statistics aside)."""
    size: dict[torch.dtype, int] = {}
    for name in reader.names():
        info = reader.info(name)
        if info.dtype.is_floating_point and ".weight." not in name:
            size[info.dtype] = size.get(info.dtype, 0) + info.nbytes
    return max(size, key=size.get) if size else None


def resolve_dtype(name: str, config, device: torch.device, reader: CheckpointReader | None = None) -> torch.dtype:
    """``--dtype``: fp32 / bf16 / fp16, or ``auto``: on the CPU the dtype the checkpoint's tensors are
    stored in (else its config's, else fp32), on a GPU bf16 where it has it (fp16 where not)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        stored = (stored_dtype(reader) if reader is not None else None) or layout.checkpoint_dtype(config)
        return stored if stored in DTYPE_NAMES else torch.float32
    if name not in DTYPES:
        raise DtypeError(f"--dtype must be one of {', '.join(DTYPES)} or auto, got {name!r}")
    check_dtype_runs(DTYPES[name], device)
    return DTYPES[name]


def load_pretrained(model_dir: str, dtype: str | torch.dtype = "auto", device=None, quant: str = "none",
                    blocksize: int = 64, double_quant: bool = True, progress=None) -> nn.Module:
    """The causal LM in ``model_dir`` on ``device`` (default: the GPU when there is one), its floating
    tensors in ``dtype`` (a name or a torch dtype; see :func:`resolve_dtype`). ``quant="nf4"``
    quantizes every linear but the head as it is read (QLoRA's base); a bitsandbytes 4-bit
    checkpoint loads as NF4 whatever ``quant`` says. ``progress(n_done, n_total)`` is called per
    module loaded. Errors name the file and the tensor."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = layout.read_config(model_dir)
    stored = layout.stored_quantization(config)
    if stored is not None:
        del config.quantization_config  # the modules are built plain, then the 4-bit ones replaced
    reader = CheckpointReader(model_dir)
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, config, device, reader)
    try:
        return _load(config, stored, reader, dtype, device, quant, blocksize, double_quant, progress)
    finally:
        reader.close()


def _load(config, stored, reader, dtype, device, quant, blocksize, double_quant, progress) -> nn.Module:
    model = layout.empty_causal_lm(config, dtype)
    tied = tied_keys(model)
    model_keys = [k for k in model.state_dict(keep_vars=True) if k not in tied]
    mapping = key_map(model, reader, model_keys)
    if stored is not None:
        targets = _stored_nf4(model, mapping, reader)
    else:
        targets = layout.quantized_linears(model) if quant == "nf4" else {}
    _check_names_and_shapes(model, reader, mapping, model_keys, targets, stored is not None)
    compute_dtype = dtype
    modules = [(n, m) for n, m in model.named_modules()
               if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))]
    for i, (name, module) in enumerate(modules):
        if name in targets:
            _put_nf4(model, name, module, reader, mapping, targets[name], stored is not None, device, dtype,
                     compute_dtype, blocksize, double_quant)
        else:
            _put_tensors(module, name, reader, mapping, device, dtype)
        if progress is not None:
            progress(i + 1, len(modules))
    if tied and getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise CheckpointFileError(f"{reader.listing}: no tensor for {left[:5]} that the model needs")
    if hasattr(model.config, "dtype"):
        model.config.dtype = dtype
    return model.eval()


def _stored_nf4(model: nn.Module, mapping: dict[str, str], reader: CheckpointReader) -> dict[str, bool]:
    """{module name: False} for every module whose weight the checkpoint holds in 4 bits (stored
    [out, in], Conv1D included)."""
    targets = {}
    for key, ckpt_key in mapping.items():
        module_name, _, leaf = key.rpartition(".")
        fp4 = f"{ckpt_key}.quant_state.bitsandbytes__fp4"
        if leaf == "weight" and (f"{ckpt_key}.{QUANT_STATE_KEY}" in reader or fp4 in reader):
            module = model.get_submodule(module_name)
            if not (isinstance(module, nn.Linear) or layout.is_conv1d(module)):
                raise CheckpointFileError(f"{reader.info(ckpt_key).file}: {ckpt_key!r} is 4-bit but the model's "
                                          f"{module_name} is a {type(module).__name__}, not a linear")
            targets[module_name] = False
    return targets


def _out_in(module: nn.Module) -> tuple[int, int]:
    if layout.is_conv1d(module):
        return module.weight.shape[1], module.weight.shape[0]
    return module.out_features, module.in_features


def _check_names_and_shapes(model, reader, mapping, model_keys, targets, prequantized: bool) -> None:
    """Every parameter present in the checkpoint with the shape config.json implies (quantized
    weights: the shape their quant state records), before anything is read."""
    missing = missing_parameters(model, mapping, model_keys)
    if missing:
        extra = sorted(set(reader.names()) - set(mapping.values()))
        hint = f"; the checkpoint has other names, e.g. {extra[:3]}" if extra else ""
        raise CheckpointFileError(f"{reader.listing}: no tensor for {missing[:5]}"
                                  f"{' and more' if len(missing) > 5 else ''} that the model "
                                  f"({type(model).__name__} from config.json) needs{hint}")
    state = model.state_dict(keep_vars=True)
    for key, ckpt_key in mapping.items():
        module_name, _, leaf = key.rpartition(".")
        if prequantized and module_name in targets and leaf == "weight":
            continue  # shape checked from the quant state when read
        expected = tuple(state[key].shape)
        got = reader.info(ckpt_key).shape
        if got != expected:
            raise CheckpointFileError(f"{reader.info(ckpt_key).file}: tensor {ckpt_key!r} has shape {got}, but the "
                                      f"model built from config.json expects {expected}")


def _place(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A copy of the mapped tensor ``t`` on ``device``, floating tensors in ``dtype``."""
    target = dtype if t.is_floating_point() else t.dtype
    if device.type == "cpu":
        return t.to(dtype=target, copy=True)
    return t.to(device).to(target)


def _as_stored(reader, key: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """The tensor as it lies in the file (``CheckpointReader.mapped``) when the run keeps it on the
    CPU in its stored dtype, else None (it is copied)."""
    info = reader.info(key)
    if device.type != "cpu" or (info.dtype.is_floating_point and info.dtype != dtype):
        return None
    return reader.mapped(key)


def _put_tensors(module: nn.Module, name: str, reader, mapping, device, dtype) -> None:
    prefix = f"{name}." if name else ""
    wanted = {}
    for leaf, p in module.named_parameters(recurse=False):
        if prefix + leaf in mapping:
            wanted[leaf] = mapping[prefix + leaf]
    for leaf, b in module.named_buffers(recurse=False):
        if prefix + leaf in mapping:
            wanted[leaf] = mapping[prefix + leaf]
    if not wanted:
        return
    got = {key: _as_stored(reader, key, device, dtype) for key in wanted.values()}
    copied = [key for key, t in got.items() if t is None]
    if copied:
        got.update(reader.read(copied, lambda key, t: _place(t, device, dtype)))
    for leaf, ckpt_key in wanted.items():
        if leaf in module._parameters:
            old = module._parameters[leaf]
            module._parameters[leaf] = nn.Parameter(got[ckpt_key], requires_grad=old.requires_grad and
                                                    got[ckpt_key].is_floating_point())
        else:
            module._buffers[leaf] = got[ckpt_key]
    for leaf, b in list(module._buffers.items()):  # computed buffers (rotary frequencies): to the device
        if b is not None and leaf not in wanted and b.device != device:
            module._buffers[leaf] = b.to(device)


def _put_nf4(model, name, module, reader, mapping, transposed, prequantized, device, dtype, compute_dtype,
             blocksize, double_quant) -> None:
    weight_key = mapping[f"{name}.weight"]
    out_in = _out_in(module)
    if prequantized:
        w4 = read_nf4(reader, weight_key, device)
        if tuple(w4.shape) != out_in:
            raise CheckpointFileError(f"{reader.info(weight_key).file}: 4-bit tensor {weight_key!r} holds shape "
                                      f"{tuple(w4.shape)}, but the model built from config.json expects {out_in}")
    else:
        def quantize(key, t):
            t = t.to(device) if device.type != "cpu" else t
            return quantize_sliced(t.t().contiguous() if transposed else t, blocksize, double_quant)

        w4 = reader.read([weight_key], quantize)[weight_key]
    bias = None
    if getattr(module, "bias", None) is not None:
        bias_key = mapping.get(f"{name}.bias")
        if bias_key is None:
            raise CheckpointFileError(f"{reader.listing}: no tensor for {name + '.bias'!r} that the model needs")
        bias = reader.read([bias_key], lambda key, t: _place(t, device, dtype))[bias_key]
    layer = NF4Linear(w4, bias, compute_dtype)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
