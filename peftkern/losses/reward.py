"""Bradley-Terry reward-model loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from peftkern.losses._common import check_same_shape


def reward_model_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                      margin: torch.Tensor | float | None = None,
                      center_rewards_coefficient: float | None = None) -> torch.Tensor:
    """-mean log s(r_chosen - r_rejected - margin): the Bradley-Terry pairwise loss (Ouyang et al.
    2022, arXiv:2203.02155, Eq. 1; the margin as in Llama 2, arXiv:2307.09288, Eq. 2), plus
    ``center_rewards_coefficient`` * mean((r_chosen + r_rejected)^2) to keep rewards centred
    (Eisenstein et al. 2023, arXiv:2312.09244), as TRL's RewardTrainer.

    chosen_rewards, rejected_rewards [B] (a trailing dim of 1 is dropped); margin [B] or a number.
    """
    if chosen_rewards.dim() == 2 and chosen_rewards.shape[-1] == 1:
        chosen_rewards, rejected_rewards = chosen_rewards.squeeze(-1), rejected_rewards.squeeze(-1)
    check_same_shape("reward_model_loss", chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * ((chosen_rewards + rejected_rewards) ** 2).mean()
    return loss
