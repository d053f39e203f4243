"""Drive the real TRL 1.16 GRPOTrainer / RLOOTrainer loss code and advantage code on given tensors:
each method runs unbound on a stand-in ``self`` holding only what it reads (one process, one
micro-batch per step), with the policy's per-token log-probs handed in through a stubbed
``_get_per_token_logps_and_entropies``."""
from collections import defaultdict
from types import MethodType, SimpleNamespace

import torch

_accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0,
                               gather=lambda x: x, gather_for_metrics=lambda x: x, reduce=lambda x, reduction: x,
                               pad_across_processes=lambda x, dim=0, pad_index=0: x)


def _stand_in(**attrs):
    return SimpleNamespace(model=SimpleNamespace(training=True), accelerator=_accelerator,
                           _metrics=defaultdict(lambda: defaultdict(list)), aux_loss_enabled=False, **attrs)


def trl_grpo_loss(logps, old_logps, ref_logps, advantages, mask, *, loss_type, epsilon=0.2, epsilon_high=None,
                  beta=0.0, delta=None, importance_sampling_level="token", max_completion_length=None,
                  num_items_in_batch=None, entropies=None, top_entropy_quantile=1.0):
    """GRPOTrainer._compute_loss on per-token log-probs [B, T] (differentiable) -> (loss, metrics dict)."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    B, T = logps.shape
    ent = entropies if entropies is not None else torch.zeros(B, T)
    fake = _stand_in(top_entropy_quantile=top_entropy_quantile, off_policy_mask_threshold=None,
                     importance_sampling_level=importance_sampling_level, beta=beta, loss_type=loss_type,
                     epsilon_low=epsilon, epsilon_high=epsilon if epsilon_high is None else epsilon_high,
                     args=SimpleNamespace(use_bias_correction_kl=False, delta=delta, steps_per_generation=1),
                     use_vllm=False, vllm_importance_sampling_correction=False, current_gradient_accumulation_steps=1,
                     max_completion_length=max_completion_length, _entropy_bonus_enabled=False)
    fake._get_per_token_logps_and_entropies = lambda *a, **k: (logps, ent, None)
    fake.get_high_entropy_mask = MethodType(GRPOTrainer.get_high_entropy_mask, fake)
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": advantages,
              "num_items_in_batch": torch.as_tensor(mask.sum() if num_items_in_batch is None else num_items_in_batch)}
    if old_logps is not None:
        inputs["old_per_token_logps"] = old_logps
    if beta:
        inputs["ref_per_token_logps"] = ref_logps
    loss = GRPOTrainer._compute_loss(fake, None, inputs)
    return loss, {k: v[-1] for k, v in fake._metrics["train"].items()}


def trl_rloo_loss(logps, old_seq_logps, advantages, mask, *, epsilon=0.2, epsilon_high=None):
    """RLOOTrainer._compute_loss on per-token log-probs [B, T] -> (loss, metrics)."""
    from trl.trainer.rloo_trainer import RLOOTrainer

    B, T = logps.shape
    fake = _stand_in(epsilon_low=epsilon, epsilon_high=epsilon if epsilon_high is None else epsilon_high)
    fake._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros(B, T), None)
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": advantages, "old_logps": old_seq_logps}
    loss = RLOOTrainer._compute_loss(fake, None, inputs)
    return loss, {k: v[-1] for k, v in fake._metrics["train"].items()}


def _nanstd():
    from trl.trainer.utils import nanstd

    return nanstd


def trl_group_advantages(rewards, num_generations, scale_rewards):
    """The advantage lines of GRPOTrainer._generate_and_score_completions (sum_then_normalize)."""
    nanstd = _nanstd()
    mean = torch.nanmean(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations, dim=0)
    if scale_rewards in ("group", "none"):
        std = nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations, dim=0)
    else:
        std = nanstd(rewards).expand_as(rewards)
    adv = rewards - mean
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0)


def trl_rloo_advantages(rewards, num_generations, normalize):
    """The advantage lines of RLOOTrainer._generate_and_score_completions."""
    nanstd = _nanstd()
    grouped = rewards.view(-1, num_generations)
    counts = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    baselines = ((torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (counts - 1)).view(-1)
    adv = rewards - baselines
    if normalize:
        adv = (adv - torch.nanmean(adv)) / (nanstd(adv) + 1e-4)
    return torch.nan_to_num(adv, nan=0.0)
