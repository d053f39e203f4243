"""ROME's update against the paper's least-squares problem, solved densely by hand in float64."""
import torch

from peftkern.editing import ValueSettings, key_statistics, rome
from peftkern.editing.requests import EditRequest
from tests.editing.micro import CORPUS, PREFIXES, REQUEST, micro_model

LAYER = 1
LOOSE = ValueSettings(steps=8, clamp_factor=1e3)


def _hand_keys(model, tok, texts, layer):
    """The down projection's inputs at every token of ``texts`` ([tokens, in]), by a plain hook."""
    seen = []
    handle = model.model.layers[layer].mlp.down_proj.register_forward_hook(lambda m, a, o: seen.append(a[0][0]))
    try:
        with torch.no_grad():
            for text in texts:
                ids = [tok.bos_token_id] + list(text.encode("utf-8"))  # byte tokenizer: id = byte
                model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return seen


def _byte_ids_ok(tok):
    text = "Velora's"
    assert tok(text, add_special_tokens=True)["input_ids"] == list(text.encode())


def test_key_statistics_are_the_corpus_second_moment(tok):
    _byte_ids_ok(tok)
    model = micro_model("llama", dtype=torch.float64)
    keys = torch.cat(_hand_keys(model, tok, CORPUS, LAYER))
    stats = key_statistics(model, tok, LAYER, corpus=CORPUS, cache=False)
    assert stats.count == keys.shape[0]
    torch.testing.assert_close(stats.mom2, keys.t() @ keys / keys.shape[0], rtol=1e-12, atol=1e-15)


def test_rank_one_update_equals_the_constrained_least_squares_solution(tok):
    model = micro_model("llama", dtype=torch.float64)
    edit = rome(model, tok, REQUEST, LAYER, corpus=CORPUS, prefixes=PREFIXES, settings=LOOSE, cache=False)
    name = f"model.layers.{LAYER}.mlp.down_proj"
    assert list(edit.factors) == [name] and edit.rank(name) == 1

    # k*: the key at the subject's last token ("a" of Velora), averaged over the prefixes, by hand
    request = EditRequest(**{k: REQUEST[k] for k in ("prompt", "subject", "target_new")})
    k_rows = []
    for prefix in PREFIXES:
        text = prefix + request.text
        last = 1 + len(prefix) + request.text.index("Velora") + len("Velora") - 1  # BOS + bytes
        k_rows.append(_hand_keys(model, tok, [text], LAYER)[0][last])
    k_star = torch.stack(k_rows).mean(0)
    keys = torch.cat(_hand_keys(model, tok, CORPUS, LAYER))
    w = model.model.layers[LAYER].mlp.down_proj.weight.detach()
    delta = edit.factors[name][1][:, 0]
    v_star = w @ k_star + delta

    # minimize ||(W' - W) K^T||^2 subject to W' k* = v*, row by row through its KKT system:
    # [2 K^T K  k*] [d_i]   [0          ]
    # [k*^T     0 ] [mu ] = [(v* - W k*)_i]
    n_in = k_star.shape[0]
    kkt = torch.zeros(n_in + 1, n_in + 1, dtype=torch.float64)
    kkt[:n_in, :n_in] = 2 * keys.t() @ keys
    kkt[:n_in, n_in] = k_star
    kkt[n_in, :n_in] = k_star
    rhs = torch.zeros(n_in + 1, w.shape[0], dtype=torch.float64)
    rhs[n_in] = v_star - w @ k_star
    by_hand = torch.linalg.solve(kkt, rhs)[:n_in].t()                    # [out, in]

    torch.testing.assert_close(edit.delta_weight(name), by_hand, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close((w + edit.delta_weight(name)) @ k_star, v_star, rtol=1e-10, atol=1e-12)


def test_delta_moves_the_model_towards_the_new_target(tok):
    model = micro_model("llama", dtype=torch.float64)
    edit = rome(model, tok, REQUEST, LAYER, corpus=CORPUS, prefixes=PREFIXES, settings=LOOSE, cache=False)
    record = edit.info["value"]
    assert record["steps"] >= 1 and record["nll"] < record["nll_start"]
    assert record["delta_norm"] > 0
