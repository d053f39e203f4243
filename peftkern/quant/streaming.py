"""NF4 one tensor at a time: quantize a weight in slices (the same codes as quantizing it whole,
with temporaries the size of a slice), match a checkpoint's tensor names to a model's, read a
bitsandbytes 4-bit weight back as an NF4Weight, and ``quantize_checkpoint``: a 16-bit
transformers folder -> the 4-bit folder transformers + bitsandbytes write, holding one 16-bit
weight and one output shard in memory at a time.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from peftkern.quant import layout
from peftkern.quant.nf4 import QUANT_STATE_KEY, NF4Weight, check_weight
from peftkern.quant.shards import CheckpointFileError, CheckpointReader, ShardWriter, copy_side_files, staged_directory
from peftkern.reference import nf4 as ref

BNB_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", QUANT_STATE_KEY)
SLICE_ELEMENTS = 1 << 22  # 4M elements: ~100 MB of fp32 temporaries at most, whatever the weight's size


def quantize_sliced(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                    slice_elements: int = SLICE_ELEMENTS) -> NF4Weight:
    """``peftkern.quant.quantize_nf4(w, blocksize, double_quant)``, byte for byte, computed over
    ``slice_elements`` (rounded to whole blocks) at a time: NF4 blocks run over the flattened
    weight, so slices of whole blocks quantize independently; double quantization then runs over
    all the block maxima together."""
    check_weight(w, blocksize)
    flat = w.detach().reshape(-1)
    step = max(blocksize, slice_elements // blocksize * blocksize)
    packed, absmax = [], []
    with torch.no_grad():
        for start in range(0, flat.numel(), step):
            p, a = ref.quantize_nf4_codes(flat[start:start + step], blocksize)
            packed.append(p)
            absmax.append(a)
        packed_all = torch.cat(packed) if len(packed) > 1 else packed[0]
        absmax_all = torch.cat(absmax) if len(absmax) > 1 else absmax[0]
        if not double_quant:
            return NF4Weight(packed_all, absmax_all, torch.Size(w.shape), w.dtype, blocksize)
        q, nested, code, offset = ref.double_quantize(absmax_all)
    return NF4Weight(packed_all, q, torch.Size(w.shape), w.dtype, blocksize, nested, code, float(offset.item()))


def bnb_tensors(module_name: str, w4: NF4Weight) -> dict[str, torch.Tensor]:
    """The tensors bitsandbytes' ``Linear4bit`` saves for a module: ``<name>.weight`` (packed codes)
    and ``<name>.weight.<absmax | quant_map | nested_absmax | nested_quant_map | quant_state...>``,
    each its own storage (safetensors refuses shared ones)."""
    out = {f"{module_name}.weight": w4.packed}
    out.update({f"{module_name}.weight.{k}": v.clone() for k, v in w4.to_bnb().items()})
    return out


def read_nf4(reader: CheckpointReader, weight_key: str, device=None) -> NF4Weight:
    """The bitsandbytes 4-bit weight stored under ``weight_key`` (``<module>.weight`` and its
    quant-state tensors) as an NF4Weight on ``device``: the stored codes, no requantization."""
    keys = [weight_key] + [f"{weight_key}.{s}" for s in BNB_SUFFIXES if f"{weight_key}.{s}" in reader]
    if f"{weight_key}.{QUANT_STATE_KEY}" not in reader:
        fp4 = f"{weight_key}.quant_state.bitsandbytes__fp4"
        what = "FP4, peftkern reads NF4 only" if fp4 in reader else f"no {QUANT_STATE_KEY} entry"
        raise CheckpointFileError(f"{reader.info(weight_key).file}: {weight_key!r} is not an NF4 4-bit weight ({what})")
    tensors = reader.read(keys, lambda name, t: t.to(device or "cpu", copy=True))
    packed = tensors.pop(weight_key)
    try:
        return NF4Weight.from_bnb(packed, {k[len(weight_key) + 1:]: v for k, v in tensors.items()})
    except (ValueError, KeyError) as exc:
        raise CheckpointFileError(f"{reader.info(weight_key).file}: {weight_key!r}: {exc}") from None


def key_map(model: nn.Module, reader: CheckpointReader, model_keys) -> dict[str, str]:
    """{model key: checkpoint key} for the keys the checkpoint has: the same name, or the name
    without / with the model's ``base_model_prefix`` (checkpoints saved from the bare decoder, as
    GPT-2's on the hub). Keys the checkpoint lacks are left out."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    out = {}
    for key in model_keys:
        for candidate in (key, key.removeprefix(prefix + ".") if prefix else key, f"{prefix}.{key}" if prefix else key):
            if candidate in reader:
                out[key] = candidate
                break
    return out


def tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys that name a tensor already named earlier (tied weights: the output head
    sharing the input embedding)."""
    seen, tied = set(), set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            tied.add(key)
        seen.add(id(tensor))
    return tied


def quantize_checkpoint(model_dir: str, out_dir: str, blocksize: int = 64, double_quant: bool = True,
                        compute_dtype: torch.dtype = torch.bfloat16, quantize_head: bool = False,
                        max_shard_bytes: int = 5 * 10**9, device=None, progress=None) -> dict:
    """Write ``out_dir``: ``model_dir``'s checkpoint with its linears in NF4, exactly as
    ``AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=BitsAndBytesConfig(
    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=...)).save_pretrained``
    writes it (names, quant-state entries, ``quantization_config``), plus the tokenizer files.
    Each weight is read (memory-mapped), quantized on ``device`` (default: the GPU when there is
    one) and dropped before the next. ``progress(module_name)`` is called per quantized linear.
    Returns a summary (counts, bits per parameter, bytes before and after, tensors ignored)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = layout.read_config(model_dir)
    if layout.stored_quantization(config) is not None:
        raise layout.ModelFolderError(f"{model_dir}: already quantized (its config.json has a quantization_config)")
    reader = CheckpointReader(model_dir)
    model = layout.empty_causal_lm(config, layout.checkpoint_dtype(config) or torch.float32)
    targets = layout.quantized_linears(model, quantize_head=quantize_head)
    model_keys = [k for k in model.state_dict() if k not in tied_keys(model)]
    mapping = key_map(model, reader, model_keys)
    missing = missing_parameters(model, mapping, model_keys)
    if missing:
        raise CheckpointFileError(f"{reader.listing}: no tensor for {missing[:5]}{' and more' if len(missing) > 5 else ''} "
                                  "that the model needs")
    ignored = sorted(set(reader.names()) - set(mapping.values()))
    params = quant_bits = 0
    with staged_directory(out_dir) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        for key in model_keys:
            if key not in mapping:
                continue
            module_name, _, leaf = key.rpartition(".")
            if leaf == "weight" and module_name in targets:
                w4 = reader.read([mapping[key]], lambda name, t: _quantize(t.to(device), targets[module_name],
                                                                          blocksize, double_quant))[mapping[key]]
                for name, tensor in bnb_tensors(module_name, w4).items():
                    writer.add(name, tensor)
                params += w4.numel
                quant_bits += w4.bits_per_param * w4.numel
                if progress is not None:
                    progress(module_name)
            else:
                writer.add(key, reader.read([mapping[key]])[mapping[key]])
        writer.close()
        config.quantization_config = layout.bnb_nf4_config(double_quant, compute_dtype, None if not quantize_head else [])
        config.save_pretrained(tmp)
        copy_side_files(model_dir, tmp)
    return {"linears": len(targets), "params": params, "bits_per_param": quant_bits / max(params, 1),
            "kept": sorted(layout.output_head_names(model)) if not quantize_head else [],
            "bytes_before": sum(os.path.getsize(f) for f in reader.files),
            "bytes_after": sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir)
                               if f.endswith(".safetensors")),
            "ignored": ignored}


def _quantize(w: torch.Tensor, transposed: bool, blocksize: int, double_quant: bool) -> NF4Weight:
    w4 = quantize_sliced(w.t().contiguous() if transposed else w, blocksize, double_quant)
    return w4.to("cpu")


def missing_parameters(model: nn.Module, mapping: dict[str, str], model_keys) -> list[str]:
    """Model keys of parameters the checkpoint lacks (a buffer it lacks keeps the value the
    module computed from the config, as transformers does)."""
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return [k for k in model_keys if k not in mapping and k in params]


def reshard_checkpoint(model_dir: str, out_dir: str, max_shard_bytes: int, dtype: torch.dtype | None = None) -> dict:
    """Copy a checkpoint folder into safetensors shards of at most ``max_shard_bytes`` (named and
    indexed as ``save_pretrained`` does), floating tensors cast to ``dtype`` when given (a 4-bit
    checkpoint keeps its codes and statistics; its 16-bit tensors are cast), with config.json
    (its ``dtype`` updated) and the tokenizer files. One tensor is read at a time."""
    config = layout.read_config(model_dir)
    quantized = layout.stored_quantization(config) is not None
    reader = CheckpointReader(model_dir)
    stats = {n for n in reader.names() if any(n.endswith(f".weight.{s}") for s in BNB_SUFFIXES)}
    packed = {n[: -len(f".{QUANT_STATE_KEY}")] for n in stats if n.endswith(QUANT_STATE_KEY)}

    def convert(name, t):
        keep = dtype is None or not t.is_floating_point() or name in stats or name in packed
        return t.clone() if keep else t.to(dtype, copy=True)

    with staged_directory(out_dir) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        for name in reader.names():
            writer.add(name, reader.read([name], convert)[name])
        files = writer.close()
        if dtype is not None:
            config.dtype = dtype
        config.save_pretrained(tmp)
        copy_side_files(model_dir, tmp)
    return {"files": files, "tensors": len(reader.names()), "quantized": quantized,
            "bytes": sum(os.path.getsize(os.path.join(out_dir, f)) for f in files if f.endswith(".safetensors"))}
