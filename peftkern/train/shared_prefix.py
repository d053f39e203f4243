"""One forward for a prompt that G rows share: the decoder's hidden states of rows that come in groups of
``group`` copies of one prompt, each followed by its own completion (GRPO's and RLOO's rollouts), with the
prompt run once per group and its KV cache repeated for the copies, in the layout of the full forward.

The full forward of [N, T] right-padded rows runs N * T positions; this runs P * Lp (the P = N / G
prompts, padded to the longest) plus N * Tc (the completions, padded to the longest), with the same
attention: a completion attends to its prompt's cached keys and values (pad slots masked) and to its
own earlier positions, at the positions it has in the full row. Gradients reach the prompt's positions
through the repeated cache, summed over the G copies, as the full forward sums them. The hidden states
are returned in the full forward's [N, T, H] layout, so every loss reads them unchanged (a prompt
position's state is the group's; positions past a row's end are zeros and carry no label).
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from peftkern.generate.forward import cache_keyword, returned_cache


def can_share_prefix(decoder: nn.Module) -> bool:
    """Whether ``decoder`` takes a KV cache and ``position_ids`` (both needed to continue a prompt)."""
    return cache_keyword(decoder) is not None and "position_ids" in inspect.signature(decoder.forward).parameters


def shared_prefix_hidden(decoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         prompt_lengths: torch.Tensor, group: int) -> torch.Tensor:
    """Hidden states [N, T, H] of ``input_ids`` [N, T] (right-padded; ``attention_mask`` [N, T] marks
    the real tokens), whose rows come in groups of ``group`` with the same first ``prompt_lengths[i]``
    ([N] int) tokens. Equal to ``decoder(input_ids, attention_mask).last_hidden_state`` at every real
    position (up to rounding); zeros at padding."""
    N, T = input_ids.shape
    if N % group:
        raise ValueError(f"shared prefix: {N} rows are not whole groups of {group}")
    device = input_ids.device
    lengths = attention_mask.long().sum(1)
    lens = prompt_lengths.to(device=device, dtype=torch.long)
    first = torch.arange(0, N, group, device=device)
    if not bool((lens.view(-1, group) == lens[first, None]).all()):
        raise ValueError("shared prefix: the rows of a group have prompts of different lengths")
    lp = lens[first]
    Lp = int(lp.max())
    cols = torch.arange(T, device=device)  # a prompt is never longer than its rows
    prompt_mask = (cols[:Lp][None, :] < lp[:, None]).to(attention_mask.dtype)
    key = cache_keyword(decoder)
    out = decoder(input_ids=input_ids[first, :Lp], attention_mask=prompt_mask, use_cache=True, return_dict=True)
    hidden_p = out.last_hidden_state  # [P, Lp, H]
    H = hidden_p.shape[-1]
    comp_lens = (lengths - lens).clamp(min=0)
    Tc = int(comp_lens.max()) if N else 0
    parts = [hidden_p.reshape(-1, H)]
    if Tc:
        cache = returned_cache(out)
        cache.batch_repeat_interleave(group)
        take = (lens[:, None] + cols[None, :Tc]).clamp(max=T - 1)
        comp_ids = input_ids.gather(1, take)
        comp_mask = (cols[None, :Tc] < comp_lens[:, None]).to(attention_mask.dtype)
        mask = torch.cat([prompt_mask.repeat_interleave(group, dim=0), comp_mask], dim=1)
        hidden_c = decoder(input_ids=comp_ids, attention_mask=mask, position_ids=lens[:, None] + cols[None, :Tc],
                           use_cache=True, return_dict=True, **{key: cache}).last_hidden_state  # [N, Tc, H]
        parts.append(hidden_c.reshape(-1, H))
    parts.append(hidden_p.new_zeros(1, H))
    source = torch.cat(parts)
    # where each full position's state lives in ``source``: the group's prompt row, the row's completion, or zero
    pos = cols[None, :T].expand(N, T)
    prompt_row = (torch.arange(N, device=device) // group)[:, None] * Lp + pos
    comp_row = hidden_p.shape[0] * Lp + torch.arange(N, device=device)[:, None] * Tc + (pos - lens[:, None])
    zero_row = source.shape[0] - 1
    index = torch.where(pos < lens[:, None], prompt_row, torch.where(pos < lengths[:, None], comp_row, zero_row))
    return source.index_select(0, index.reshape(-1)).view(N, T, H)
