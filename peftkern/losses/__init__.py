"""Losses over log-probs (SFT, the DPO family, SimPO, CPO, ORPO, KTO, Bradley-Terry reward, Plackett-Luce and
all-pairs ranking rewards, PPO, GRPO, RLOO) and
their fused variants from hidden states, plus the on-disk cache of reference log-probs.

The extension point for a new loss from hidden states is :func:`register_unit_loss` (a per-unit
loss of the token log-probs with its analytic gradient) and :func:`fused_unit_loss`; see
docs/losses.md."""
from peftkern.losses._common import masked_mean, sequence_logps
from peftkern.losses.dpo import DPO_LOSS_TYPES, SEPARABLE_DPO_LOSS_TYPES, dpo_loss, dpo_losses
from peftkern.losses.fused import (fused_cpo_loss, fused_dpo_loss, fused_kto_loss, fused_orpo_loss,
                                   fused_sequence_logps, fused_sft_loss, fused_simpo_loss, head_parameters)
from peftkern.losses.grpo import (GRPO_LOSS_TYPES, IMPORTANCE_SAMPLING_LEVELS, SCALE_REWARDS, GRPOOutput,
                                  group_advantages, grpo_loss, rloo_advantages, rloo_loss)
from peftkern.losses.grpo_fused import fused_grpo_loss, fused_rloo_loss
from peftkern.losses.kto import KTO_LOSS_TYPES, kl_estimate, kto_loss
from peftkern.losses.ppo import (KL_ESTIMATORS, entropy_bonus, kl_penalized_rewards, kl_penalty, ppo_policy_loss,
                                 ppo_value_loss)
from peftkern.losses.preference import CPO_LOSS_TYPES, cpo_loss, orpo_loss, simpo_loss
from peftkern.losses.ranking import (RANK_LOSSES, all_pairs_bradley_terry_loss, pairwise_accuracy, plackett_luce_loss,
                                     rank_loss, ranked_scores)
from peftkern.losses.ref_cache import RefLogpCache
from peftkern.losses.reward import reward_model_loss
from peftkern.losses.sft import sft_loss
from peftkern.ops.logprob_units import UnitChunk, UnitGrads, register_unit_loss
from peftkern.ops.logprobs import UnitLossOutput, fused_unit_loss

__all__ = [
    "GRPO_LOSS_TYPES", "IMPORTANCE_SAMPLING_LEVELS", "SCALE_REWARDS", "GRPOOutput", "group_advantages", "grpo_loss",
    "rloo_advantages", "rloo_loss", "fused_grpo_loss", "fused_rloo_loss",
    "CPO_LOSS_TYPES", "DPO_LOSS_TYPES", "KL_ESTIMATORS", "KTO_LOSS_TYPES", "RefLogpCache", "SEPARABLE_DPO_LOSS_TYPES",
    "UnitChunk", "UnitGrads", "UnitLossOutput", "cpo_loss", "dpo_loss", "dpo_losses", "entropy_bonus",
    "fused_cpo_loss", "fused_dpo_loss", "fused_kto_loss", "fused_orpo_loss", "fused_sequence_logps",
    "fused_sft_loss", "fused_simpo_loss", "fused_unit_loss", "head_parameters", "kl_estimate",
    "kl_penalized_rewards", "kl_penalty", "kto_loss", "masked_mean", "orpo_loss", "ppo_policy_loss",
    "ppo_value_loss", "register_unit_loss", "reward_model_loss", "sequence_logps", "sft_loss", "simpo_loss",
    "RANK_LOSSES", "all_pairs_bradley_terry_loss", "pairwise_accuracy", "plackett_luce_loss", "rank_loss",
    "ranked_scores",
]
