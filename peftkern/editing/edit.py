"""Edit: the result of ROME or MEMIT, a low-rank delta per edited projection, and its life as a
LoRA adapter in PEFT's files.

For each edited module, ``factors[name] = (A, B)`` with A [r, in] and B [out, r] (float64, CPU;
cast to the adapter's dtype when applied or saved):
the edited layer computes ``y = W x + b + B (A x)``, the dense update being ``Delta W = B @ A``
([out, in]; GPT-2's Conv1D stores its weight transposed, and its adapter is marked
``fan_in_fan_out`` as PEFT does). As an adapter the scaling is 1 (``lora_alpha = r``), A goes to
``lora_A`` and B to ``lora_B``: an Edit saved with :meth:`Edit.save` loads with
``peftkern.load_adapter`` and with ``peft.PeftModel.from_pretrained``, and switches off, stacks
with other adapters and merges like any LoRA adapter.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

import torch
from torch import nn

from peftkern.editing.layout import base_model
from peftkern.editing.requests import EditError, EditRequest
from peftkern.tuners import LoraConfig, PeftKernModel, get_peft_model, save_adapter

WEIGHTS_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"  # PEFT's file names


@dataclass
class Edit:
    """What ``rome`` / ``memit`` return: ``factors`` per module name (of the transformers model),
    the ``layers`` edited, the ``requests`` written, and ``info`` (per request: the optimization
    of delta, the causal trace when the layer was located)."""
    method: str
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    layers: list[int]
    requests: list[EditRequest]
    info: dict = field(default_factory=dict)
    fan_in_fan_out: bool = False   # the edited modules store their weight [in, out] (GPT-2's Conv1D)

    def delta_weight(self, name: str) -> torch.Tensor:
        """Delta W = B @ A, [out, in] (as nn.Linear stores a weight)."""
        a, b = self.factors[name]
        return b @ a

    def rank(self, name: str) -> int:
        return self.factors[name][0].shape[0]

    def lora_config(self) -> LoraConfig:
        """PEFT's LoRA config for this edit: the edited modules by full name, scaling 1, no dropout."""
        names = sorted(self.factors)
        ranks = {n: self.rank(n) for n in names}
        r = max(ranks.values())
        pattern = {n: k for n, k in ranks.items() if k != r}
        return LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=names, bias="none",
                          fan_in_fan_out=self.fan_in_fan_out,
                          rank_pattern=_anchored(pattern), alpha_pattern=_anchored(pattern),
                          init_lora_weights=True, task_type="CAUSAL_LM")

    def apply(self, model: nn.Module, adapter_name: str = "edit") -> PeftKernModel:
        """Add this edit to ``model`` as adapter ``adapter_name`` and switch it on.

        A plain transformers model is wrapped (``get_peft_model``, changed in place as PEFT does);
        on a PeftKernModel the adapter is added and runs together with the adapters already
        active (stacking). Returns the PeftKernModel; ``disable_adapter()``, ``set_adapter``,
        ``delete_adapter`` and ``merge_and_unload`` work on it as on any adapter."""
        config = self.lora_config().replace(inference_mode=True)
        if isinstance(model, PeftKernModel):
            if adapter_name in model.peft_config:
                raise EditError(f"adapter {adapter_name!r} already exists on the model ({list(model.peft_config)})")
            active = list(model.active_adapters)
            model.add_adapter(adapter_name, config)
            try:
                self._fill(model, adapter_name)
            except BaseException:
                model.delete_adapter(adapter_name)
                raise
            model.set_adapter(active + [adapter_name])
            return model
        grads = {p: p.requires_grad for p in model.parameters()}
        wrapped = get_peft_model(model, config, adapter_name)
        try:
            self._fill(wrapped, adapter_name)
        except BaseException:
            wrapped.unload()
            for p, flag in grads.items():
                p.requires_grad_(flag)
            raise
        return wrapped

    def _fill(self, wrapped: PeftKernModel, adapter_name: str) -> None:
        base = wrapped.get_base_model()
        with torch.no_grad():
            for name, (a, b) in self.factors.items():
                layer = base.get_submodule(name)
                lora_a, lora_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
                if tuple(lora_a.shape) != tuple(a.shape) or tuple(lora_b.shape) != tuple(b.shape):
                    raise EditError(f"{name}: edit factors A {tuple(a.shape)}, B {tuple(b.shape)} do not fit the "
                                    f"module's adapter ({tuple(lora_a.shape)}, {tuple(lora_b.shape)})")
                lora_a.copy_(a)
                lora_b.copy_(b)

    def save(self, model: nn.Module, directory: str | os.PathLike) -> None:
        """Write this edit as a PEFT adapter folder (``adapter_config.json`` +
        ``adapter_model.safetensors``) at ``directory``. ``model`` is the model it was computed on
        (a transformers model or a PeftKernModel); it is left as it was."""
        directory = os.path.abspath(os.fspath(directory))
        name = "peftkern_edit_tmp"
        grads = {p: p.requires_grad for p in model.parameters()}
        wrapped = self.apply(model, name)
        try:
            parent = os.path.dirname(directory)
            os.makedirs(parent, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=parent, prefix=".edit-") as tmp:
                save_adapter(wrapped, tmp, name)
                os.makedirs(directory, exist_ok=True)
                for file in (WEIGHTS_FILE, CONFIG_FILE):  # same filesystem: each a rename
                    os.replace(os.path.join(tmp, name, file), os.path.join(directory, file))
        finally:
            if wrapped is model:
                wrapped.delete_adapter(name)
            else:
                wrapped.unload()
            for p, flag in grads.items():
                p.requires_grad_(flag)

    def merge_into(self, model: nn.Module) -> None:
        """Add each Delta W to the dense weight of a plain transformers model, in place (what the
        papers do; the adapter form gives the same outputs)."""
        base = base_model(model)
        with torch.no_grad():
            for name in self.factors:
                module = base.get_submodule(name)
                delta = self.delta_weight(name).to(module.weight.device, torch.float64)
                if tuple(module.weight.shape) == tuple(delta.t().shape) and type(module).__name__ == "Conv1D":
                    delta = delta.t()
                module.weight.copy_((module.weight.to(torch.float64) + delta).to(module.weight.dtype))


def _anchored(pattern: dict[str, int]) -> dict[str, int]:
    """rank/alpha patterns keyed by the exact module name (regex-escaped dots)."""
    return {name.replace(".", r"\."): k for name, k in pattern.items()}


def combine(edits: list[Edit], method: str | None = None) -> Edit:
    """One Edit equal to applying ``edits`` together: per module the factors are concatenated
    (A stacked along rows, B along columns), so Delta W is the sum of theirs and the rank adds up."""
    if not edits:
        raise EditError("combine needs at least one edit")
    factors: dict[str, tuple[list, list]] = {}
    for e in edits:
        for name, (a, b) in e.factors.items():
            pa, pb = factors.setdefault(name, ([], []))
            pa.append(a)
            pb.append(b)
    return Edit(method or "+".join(dict.fromkeys(e.method for e in edits)),
                {n: (torch.cat(a, 0), torch.cat(b, 1)) for n, (a, b) in factors.items()},
                sorted({l for e in edits for l in e.layers}), [r for e in edits for r in e.requests],
                {"parts": [e.info for e in edits]}, any(e.fan_in_fan_out for e in edits))
