"""Checks every soft-prompt method passes against the real peft (prompt tuning, prefix tuning,
P-tuning): PEFT's files both ways with PEFT's logits, PEFT's gradients, greedy tokens, the
refusals. Each test file calls these with its method's configs."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from peftkern import get_peft_model, load_adapter, save_adapter
from tests.tuners.tiny_models import token_ids

peft = pytest.importorskip("peft")

ATOL = 1e-5


def padded_batch():
    ids = token_ids(batch=3, seq=7)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, -2:] = 0  # right padding
    return ids, mask


def perturb(encoder_owner, scale=0.3, seed=5):
    """New random values in every parameter of the soft prompt (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder_owner.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def their_encoder(theirs):
    return theirs.prompt_encoder["default"]


def our_encoder(ours, name="default"):
    return ours.model.prompt_encoder[name]


def out_logits(model, ids, mask=None, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


def check_files_both_ways(tmp_path, base, their_config, our_config):
    """A PEFT-trained adapter loads here with PEFT's logits (padded batch, fp32, 1e-5); ours loads
    in PEFT with ours; the files hold PEFT's one key, shapes and config keys."""
    ids, mask = padded_batch()
    theirs = peft_model(base, their_config)
    perturb(their_encoder(theirs))
    theirs.save_pretrained(tmp_path / "peft")
    expected = out_logits(theirs, ids, mask)
    ours = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert (expected[:, -7:] - out_logits(base, ids, mask)).abs().max() > 1e-3  # the prompt matters
    assert (out_logits(ours, ids, mask) - expected).abs().max().item() < ATOL

    mine = get_peft_model(copy.deepcopy(base), our_config)
    perturb(our_encoder(mine), seed=6)
    save_adapter(mine, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    mine.eval()
    assert (out_logits(back, ids, mask) - out_logits(mine, ids, mask)).abs().max().item() < ATOL

    theirs_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert list(ours_file) == list(theirs_file) == ["prompt_embeddings"]
    assert ours_file["prompt_embeddings"].shape == theirs_file["prompt_embeddings"].shape
    their_json = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    our_json = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(our_json) - {"peft_version"} == set(their_json) - {"peft_version"}
    for key in ("num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules",
                "peft_type", "encoder_hidden_size"):
        assert our_json.get(key) == their_json.get(key), key
    return theirs, mine


def peft_model(base, config):
    torch.manual_seed(11)
    return peft.get_peft_model(copy.deepcopy(base), config)


def check_training_matches_peft(base, their_config, our_config):
    """The same encoder weights: training-mode loss with labels and every encoder gradient equal
    PEFT's; no gradient reaches the base model; the trainable count is PEFT's."""
    ids, mask = padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    theirs = peft_model(base, their_config)
    ours = get_peft_model(copy.deepcopy(base), our_config)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    perturb(their_encoder(theirs), scale=0.1)
    our_encoder(ours).load_state_dict(their_encoder(theirs).state_dict())
    for model in (theirs, ours):
        model.eval()  # dropout off in both (the base models have none; the LSTM's between layers)
    their_loss = theirs(input_ids=ids, attention_mask=mask, labels=labels).loss
    our_loss = ours(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert abs(their_loss.item() - our_loss.item()) < 1e-5
    their_loss.backward()
    our_loss.backward()
    theirs_grads = dict(their_encoder(theirs).named_parameters())
    for name, p in our_encoder(ours).named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name
        assert torch.allclose(p.grad, theirs_grads[name].grad, rtol=1e-4, atol=1e-6), name
    assert all(p.grad is None for n, p in ours.named_parameters() if "prompt_encoder" not in n)
    return theirs, ours


def greedy_by_forward(model, ids, steps):
    """Greedy decoding by a full forward per token (no cache): the reference for generate()."""
    seq = ids
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq


def check_greedy_generate(base, their_config, our_config, steps=6):
    """Our generate() (through the KV cache) gives the tokens of greedy decoding through PEFT's
    forward. (PEFT 0.21.2's own generate() with soft prompts on transformers 5.2x does not: it
    looks for the cache under the old name past_key_values and re-injects the prompt each step.)"""
    theirs = peft_model(base, their_config).eval()
    perturb(their_encoder(theirs))
    ours = get_peft_model(copy.deepcopy(base), our_config).eval()
    our_encoder(ours).load_state_dict(their_encoder(theirs).state_dict())
    ids = token_ids(batch=2, seq=5, seed=4)
    expected = greedy_by_forward(theirs, ids, steps)
    got = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                        min_new_tokens=steps, pad_token_id=0)
    assert got.tolist() == expected.tolist()
    # left-padded prompts: generate() through the cache equals our own full-forward greedy decoding
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                        do_sample=False, pad_token_id=0)
    seq, m = ids, mask
    with torch.no_grad():
        for _ in range(steps):
            pos = (m.cumsum(-1) - 1).clamp_min(0)
            nxt = ours(input_ids=seq, attention_mask=m, position_ids=pos).logits[:, -1].argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert got.tolist() == seq.tolist()
    assert "prepare_inputs_for_generation" not in vars(ours.model)  # the step hook is taken off again


def check_model_level_behaviour(base, our_config):
    """disable_adapter is the base; merge_and_unload refuses; unload gives back the plain model;
    mixed-adapter rows refuse; delete_adapter removes the encoder."""
    ids, mask = padded_batch()
    ours = get_peft_model(copy.deepcopy(base), our_config).eval()
    perturb(our_encoder(ours))
    plain = out_logits(base, ids, mask)
    with ours.disable_adapter():
        assert (out_logits(ours, ids, mask) - plain).abs().max().item() < ATOL
    assert ours.prepended_positions() in (0, our_config.num_virtual_tokens)
    with pytest.raises(ValueError, match="soft prompt .* cannot be merged"):
        ours.merge_and_unload()
    assert "default" in ours.peft_config and hasattr(ours.model, "prompt_encoder")  # nothing changed
    with pytest.raises(ValueError, match="adapter_names= .*soft prompts"):
        ours(input_ids=ids, adapter_names=["default"] * 3)
    state = ours.model.state_dict().keys()
    assert any(k.startswith("prompt_encoder.default.") for k in state)
    model = ours.unload()
    assert not hasattr(model, "prompt_encoder")
    assert (out_logits(model, ids, mask) - plain).abs().max().item() < ATOL
    again = get_peft_model(copy.deepcopy(base), our_config)
    again.add_adapter("second", our_config)
    again.delete_adapter("default")
    assert list(again.model.prompt_encoder) == ["second"]


def check_bad_input_leaves_model(base, make_config, bad_fit: dict, match: str):
    """Zero / negative virtual tokens are refused at the config; a config that does not fit the
    model (``bad_fit``) raises ``match`` with the model left exactly as it was."""
    for bad in (0, -3, 2.5, None):
        with pytest.raises(ValueError, match="num_virtual_tokens"):
            make_config(num_virtual_tokens=bad)
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match=match):
        get_peft_model(model, make_config(num_virtual_tokens=4, **bad_fit))
    assert not hasattr(model, "prompt_encoder")
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)

