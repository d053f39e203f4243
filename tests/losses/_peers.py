"""Drive the real TRL trainers' loss code on given sequence log-probs: each trainer's loss method runs
unbound on a stand-in ``self`` holding only the attributes it reads, with a stand-in model that
returns per-token log-probs whose sums are the given sequence log-probs."""
from collections import defaultdict
from types import MethodType, SimpleNamespace

import torch

_accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)


def _outputs(log_probs):
    return SimpleNamespace(log_probs=log_probs, entropy=torch.zeros(log_probs.shape),
                           mean_logits=torch.zeros(log_probs.shape), is_top1=torch.zeros(log_probs.shape, dtype=bool))


def _token_logps(seq_logps, width):
    """[B] -> [B, width] whose rows sum to seq_logps (all in the first column)."""
    return torch.cat([seq_logps.unsqueeze(1), torch.zeros(seq_logps.shape[0], width - 1)], dim=1)


def _trainer_self(**attrs):
    return SimpleNamespace(model=SimpleNamespace(training=True), accelerator=_accelerator,
                           _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
                           aux_loss_enabled=False, **attrs)


def trl_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, loss_type, label_smoothing=0.0,
                 completion_lengths=None, width=4):
    """TRL DPOTrainer._compute_loss on these sequence log-probs [B]; completion_lengths [2B] sets the
    completion mask (IPO divides by it)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    n = chosen.shape[0] * 2
    lengths = completion_lengths if completion_lengths is not None else torch.full((n,), width)
    completion_mask = (torch.arange(width + 1)[None, :] < lengths[:, None]).long()
    inputs = {"input_ids": torch.ones(n, width + 1, dtype=torch.long), "attention_mask": torch.ones(n, width + 1),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    log_probs = _token_logps(torch.cat([chosen, rejected]), width)
    fake = _trainer_self(beta=beta, precompute_ref_logps=True, loss_types=[loss_type], loss_weights=[1.0],
                         ld_alpha=None, f_divergence_type="reverse_kl", label_smoothing=label_smoothing,
                         use_weighting=False, args=SimpleNamespace(discopop_tau=0.05))
    model = lambda **kw: _outputs(log_probs)  # noqa: E731
    return DPOTrainer._compute_loss(fake, model, inputs, return_outputs=False)


def trl_kto_loss(policy_logps, ref_logps, labels, policy_kl_logps, ref_kl_logps, beta, desirable_weight=1.0,
                 undesirable_weight=1.0, loss_type="kto", width=3):
    """TRL KTOTrainer._compute_loss: policy_logps, ref_logps, labels [B]; *_kl_logps [B]."""
    from trl.trainer.kto_trainer import KTOTrainer

    n = policy_logps.shape[0]
    main_ids = torch.ones(n, width + 1, dtype=torch.long)
    kl_ids = torch.ones(n, width + 1, dtype=torch.long)
    by_input = {id(main_ids): _token_logps(policy_logps, width), id(kl_ids): _token_logps(policy_kl_logps, width)}
    batch = {"input_ids": main_ids, "attention_mask": torch.ones(n, width + 1),
             "completion_mask": torch.ones(n, width + 1, dtype=torch.long), "label": labels,
             "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones(n, width + 1),
             "KL_completion_mask": torch.ones(n, width + 1, dtype=torch.long), "ref_logps": ref_logps,
             "ref_KL_logps": ref_kl_logps}
    fake = _trainer_self(beta=beta, precompute_ref_logps=True, calculate_KL=loss_type == "kto", loss_type=loss_type,
                         desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    fake._compute_kl_logps = MethodType(KTOTrainer._compute_kl_logps, fake)
    model = lambda input_ids, **kw: _outputs(by_input[id(input_ids)])  # noqa: E731
    return KTOTrainer._compute_loss(fake, model, batch, return_outputs=False)


def trl_simpo_losses(chosen, rejected, beta, gamma, label_smoothing=0.0):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    fake = _trainer_self(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=label_smoothing)
    return CPOTrainer.cpo_loss(fake, chosen, rejected)


def trl_orpo_losses(chosen, rejected, beta):
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    return ORPOTrainer.odds_ratio_loss(_trainer_self(beta=beta), chosen, rejected)
