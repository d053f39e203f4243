"""AdaLoRA's rank allocation (Zhang et al., 2023), as PEFT's RankAllocator computes it.

Each triplet i of a layer (row i of A, column i of B, E_i) has an importance
    S_i = s(E_i) + mean_j s(A_ij) + mean_k s(B_ki),   s(w) = Ibar(w) * Ubar(w)
where I(w) = |w * dL/dw| (sensitivity), Ibar its EMA (beta1) and Ubar the EMA (beta2) of
|I - Ibar| (uncertainty). The total budget of triplets falls from sum(init ranks) to
target_r * layers on a cubic schedule between tinit and total_step - tfinal; every deltaT steps the
E entries of the triplets at or below the budget's threshold are set to 0 (masked), and the kept
pattern is the config's rank_pattern.
"""
from __future__ import annotations

import torch


class RankAllocator:
    """Importance EMAs and masking for one trainable AdaLoRA adapter. ``layers`` maps each layer's
    lora_E name (``<module path>.lora_E.<adapter>``, PEFT's parameter name) to its AdaLoRA layer."""

    def __init__(self, config, adapter_name: str, layers: dict):
        self.config, self.adapter_name = config, adapter_name
        self.layers = dict(sorted(layers.items()))
        self.init_budget = sum(layer.lora_A[adapter_name].shape[0] for layer in self.layers.values())
        self.target_budget = config.target_r * len(self.layers)
        self.reset()

    def reset(self) -> None:
        self.ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_unc: dict[tuple[str, str], torch.Tensor] = {}

    def _params(self):
        for key, layer in self.layers.items():
            for table in ("lora_A", "lora_B", "lora_E"):
                yield (key, table), getattr(layer, table)[self.adapter_name]

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget, whether to mask at ``step``): PEFT's cubic schedule."""
        c = self.config
        if step <= c.tinit:
            return self.init_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        progress = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_budget - self.target_budget) * progress**3 + self.target_budget)
        return budget, step % c.deltaT == 0

    @torch.no_grad()
    def update_importance(self) -> None:
        beta1, beta2 = self.config.beta1, self.config.beta2
        for key, p in self._params():
            if p.grad is None:
                raise RuntimeError(f"AdaLoRA update_and_allocate: {key[0]}.{key[1]} has no gradient; call it after "
                                   "backward() and optimizer.step(), before zero_grad(), as PEFT's")
            if key not in self.ipt:
                self.ipt[key] = torch.zeros_like(p)
                self.exp_avg_ipt[key] = torch.zeros_like(p)
                self.exp_avg_unc[key] = torch.zeros_like(p)
            self.ipt[key] = (p * p.grad).abs()
            self.exp_avg_ipt[key] = beta1 * self.exp_avg_ipt[key] + (1 - beta1) * self.ipt[key]
            self.exp_avg_unc[key] = beta2 * self.exp_avg_unc[key] + (1 - beta2) * (
                self.ipt[key] - self.exp_avg_ipt[key]).abs()

    def _score(self, key) -> torch.Tensor:
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """S_i per layer ([r] each)."""
        scores = {}
        for key in self.layers:
            a = self._score((key, "lora_A")).mean(dim=1)
            b = self._score((key, "lora_B")).mean(dim=0)
            scores[key] = self._score((key, "lora_E")).view(-1) + a + b
        return scores

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero the E entries of the (init budget - budget) least important triplets; the kept pattern."""
        scores = self.triplet_scores()
        k = self.init_budget - budget
        everything = torch.cat([s for s in scores.values()])
        threshold = torch.kthvalue(everything, k).values.item() if k > 0 else -float("inf")
        pattern = {}
        for key, layer in self.layers.items():
            drop = scores[key] <= threshold
            layer.lora_E[self.adapter_name].masked_fill_(drop.view(-1, 1), 0.0)
            pattern[key] = (~drop).tolist()
        return pattern

    def update_and_allocate(self, step: int, force_mask: bool = False):
        if step < self.config.total_step - self.config.tfinal:
            self.update_importance()
        budget, mask = self.budget_schedule(step)
        return budget, (self.mask_to_budget(budget) if (mask or force_mask) else None)

    @torch.no_grad()
    def mask_using_rank_pattern(self, pattern: dict[str, list[bool]]) -> None:
        for key, layer in self.layers.items():
            mask = pattern.get(key)
            if mask is None:
                mask = pattern[key.replace(f".{self.adapter_name}", "")]
            keep = torch.tensor(mask, dtype=torch.bool, device=layer.lora_E[self.adapter_name].device)
            layer.lora_E[self.adapter_name].masked_fill_(~keep.view(-1, 1), 0.0)
