"""SFT packing without cross-contamination: whole examples per row, positions restarting at 0 for
each (transformers' padding-free convention), so every example's per-token log-probs and loss equal
the unpacked ones, on tiny Llama, Qwen2, Mistral and GPT-2 under eager and SDPA attention."""
import pytest
import torch
import transformers

from peftkern.train.data import IGNORE_INDEX, pack_examples, pad_batch
from peftkern.train.model import LMWithHeads

VOCAB = 97


def _config(arch: str, attn: str):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common)
    elif arch == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=8)  # windows shorter than a packed row
    else:
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                      bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = attn
    return cfg


def _examples(seed: int, n: int = 7) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(3, 15, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:], "where": f"record {i}"})
    return out


def _per_example_logps(model, rows_or_examples, packed: bool) -> list[torch.Tensor]:
    """The log-probs of each example's labelled tokens, in the examples' order."""
    out = {}
    for row in rows_or_examples:
        batch = pad_batch([row], pad_id=0)
        with torch.no_grad():
            logps = model(batch["input_ids"], batch["attention_mask"], batch["labels"],
                          position_ids=batch.get("position_ids"))["logps"][0]
        starts = [i for i, p in enumerate(row.get("position_ids", [0])) if p == 0] + [len(row["input_ids"])]
        for where, a, b in zip(row["where"] if packed else [row["where"]], starts, starts[1:]):
            labels = torch.tensor(row["labels"][a + 1:b])
            out[where] = logps[a:b - 1][labels != IGNORE_INDEX]
    return [out[k] for k in sorted(out)]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_packed_losses_equal_unpacked(arch, attn):
    torch.manual_seed(0)
    model = LMWithHeads(transformers.AutoModelForCausalLM.from_config(_config(arch, attn))).eval()
    examples = _examples(1)
    rows = pack_examples(examples, max_length=24)
    assert len(rows) < len(examples)  # several examples share a row
    packed = _per_example_logps(model, rows, packed=True)
    alone = _per_example_logps(model, examples, packed=False)
    for a, b in zip(packed, alone):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (arch, attn, (a - b).abs().max())
    # a padded batch of packed rows: each row's padding is a sequence of its own and changes nothing
    batch = pad_batch(rows, pad_id=0)
    with torch.no_grad():
        together = model(batch["input_ids"], None, batch["labels"], position_ids=batch["position_ids"])["logps"]
    total = sum(float(x.sum()) for x in alone)
    assert abs(float(together.sum()) - total) <= 1e-5 * abs(total)


def test_pack_examples_keeps_examples_whole_and_best_fit():
    ex = [{"input_ids": list(range(n)), "labels": list(range(n)), "where": f"r{n}"} for n in (5, 3, 6, 2, 4)]
    rows = pack_examples(ex, max_length=8)
    # best fit decreasing: 6 | 5 | 4 open rows, 3 fills the 5's row, 2 the 6's
    assert [sorted(r["where"]) for r in rows] == [["r2", "r6"], ["r3", "r5"], ["r4"]]
    for r in rows:
        assert len(r["input_ids"]) <= 8 and r["position_ids"].count(0) == len(r["where"])
    assert sorted(w for r in rows for w in r["where"]) == sorted(e["where"] for e in ex)
    with pytest.raises(ValueError, match="more than max_length=4"):
        pack_examples(ex, max_length=4)


def test_packing_refuses_an_attention_that_ignores_the_boundaries():
    from peftkern.train.errors import ConfigError
    from peftkern.train.model import check_packed_attention

    lm = transformers.AutoModelForCausalLM.from_config(_config("llama", "sdpa"))
    check_packed_attention(lm)
    decoder = lm.model
    real = decoder.forward

    def ignoring_positions(*args, position_ids=None, **kw):  # an implementation that drops the boundaries
        return real(*args, **kw)

    decoder.forward = ignoring_positions
    with pytest.raises(ConfigError, match="--packing: .* does not start a new sequence"):
        check_packed_attention(lm)
