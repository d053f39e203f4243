"""MEMIT's batched update: one request against ROME, several against the least-squares conditions."""
import torch

from peftkern.editing import ValueSettings, key_statistics, memit, rome
from peftkern.editing.compute import mean_at, optimize_delta
from peftkern.editing.layout import layout_of
from peftkern.editing.requests import as_request
from tests.editing.micro import CORPUS, PREFIXES, REQUEST, micro_model

# decay and clamp off: then delta depends only on where it is added (the same place for both
# methods), and their updates differ only in the key direction's scaling
PLAIN = ValueSettings(steps=6, weight_decay=0.0, clamp_factor=1e6)
OTHERS = [{"prompt": "{} plays the", "subject": "Mira Tolan", "target_new": "harp", "target_true": "piano"},
          {"prompt": "{} makes", "subject": "Quorvex", "target_new": "soap", "target_true": "clocks"}]


def test_one_request_matches_rome_direction_and_the_expected_scale(tok):
    model = micro_model("llama", dtype=torch.float64)
    layer, lam = 1, 3.0
    stats = key_statistics(model, tok, layer, corpus=CORPUS, cache=False)
    ours = rome(model, tok, REQUEST, layer, stats=stats, prefixes=PREFIXES, settings=PLAIN)
    theirs = memit(model, tok, [REQUEST], [layer], stats={layer: stats}, prefixes=PREFIXES, settings=PLAIN,
                   mom2_weight=lam)
    name = f"model.layers.{layer}.mlp.down_proj"
    a_r, b_r = ours.factors[name]
    a_m, b_m = theirs.factors[name]
    torch.testing.assert_close(b_m, b_r, rtol=1e-9, atol=1e-12)         # the same delta
    # (lam C + k k^T)^-1 k = C^-1 k / (lam + k^T C^-1 k): ROME's direction, scaled by a / (lam + a)
    k = mean_at(model, tok, name, "input", [as_request(REQUEST)], PREFIXES)[0]
    a = float(k @ torch.linalg.solve(stats.mom2, k))
    torch.testing.assert_close(a_m, a_r * a / (lam + a), rtol=1e-8, atol=1e-12)
    cos = torch.nn.functional.cosine_similarity(a_m.flatten(), a_r.flatten(), dim=0)
    assert float(cos) > 1 - 1e-10


def test_relative_lambda_writes_the_same_share_of_one_residual_at_every_layer(tok):
    model = micro_model("llama", dtype=torch.float64)
    scale = 0.25
    for layer in (0, 2):
        stats = key_statistics(model, tok, layer, corpus=CORPUS, cache=False)
        ours = rome(model, tok, REQUEST, layer, stats=stats, prefixes=PREFIXES, settings=PLAIN)
        theirs = memit(model, tok, [REQUEST], [layer], stats={layer: stats}, prefixes=PREFIXES, settings=PLAIN,
                       mom2_scale=scale)
        name = f"model.layers.{layer}.mlp.down_proj"
        # lambda = scale * k^T C^-1 k: a / (lambda + a) = 1 / (1 + scale), whatever a is at this layer
        torch.testing.assert_close(theirs.factors[name][0], ours.factors[name][0] / (1 + scale), rtol=1e-8, atol=1e-12)
        k = mean_at(model, tok, name, "input", [as_request(REQUEST)], PREFIXES)[0]
        a = float(k @ torch.linalg.solve(stats.mom2, k))
        assert abs(theirs.info["layers"][0]["mom2_weight"] - scale * a) <= 1e-9 * a
        assert theirs.info["mom2_scale"] == scale and theirs.info["mom2_weight"] is None


def test_relative_lambda_of_a_batch_uses_the_mean_key_score(tok):
    model = micro_model("llama", dtype=torch.float64)
    stats = key_statistics(model, tok, 1, corpus=CORPUS, cache=False)
    requests = [as_request(r) for r in [REQUEST] + OTHERS]
    name = "model.layers.1.mlp.down_proj"
    relative = memit(model, tok, requests, [1], stats={1: stats}, prefixes=PREFIXES, settings=PLAIN, mom2_scale=0.5)
    keys = mean_at(model, tok, name, "input", requests, PREFIXES)
    mean_a = float((keys * torch.linalg.solve(stats.mom2, keys.t()).t()).sum(1).mean())
    absolute = memit(model, tok, requests, [1], stats={1: stats}, prefixes=PREFIXES, settings=PLAIN,
                     mom2_weight=0.5 * mean_a)
    torch.testing.assert_close(relative.delta_weight(name), absolute.delta_weight(name), rtol=1e-9, atol=1e-12)


def test_one_request_with_default_settings_points_the_same_way(tok):
    model = micro_model("llama")
    layer = 1
    stats = key_statistics(model, tok, layer, corpus=CORPUS, cache=False)
    ours = rome(model, tok, REQUEST, layer, stats=stats, prefixes=PREFIXES)
    theirs = memit(model, tok, [REQUEST], [layer], stats={layer: stats}, prefixes=PREFIXES)
    name = f"model.layers.{layer}.mlp.down_proj"
    d_r, d_m = ours.delta_weight(name).flatten(), theirs.delta_weight(name).flatten()
    # same key direction; delta differs only by the decay/clamp anchor (MLP output vs residual stream)
    cos = torch.nn.functional.cosine_similarity(ours.factors[name][0], theirs.factors[name][0]).item()
    assert cos > 1 - 1e-5
    assert torch.nn.functional.cosine_similarity(d_r, d_m, dim=0).item() > 0.5


def test_small_lambda_writes_every_residual_exactly(tok):
    model = micro_model("llama", dtype=torch.float64)
    layers = [0, 1]
    requests = [as_request(r) for r in [REQUEST] + OTHERS]
    edit = memit(model, tok, requests, layers, corpus=CORPUS, prefixes=PREFIXES, settings=PLAIN, mom2_weight=1e-9,
                 cache=False)
    assert [edit.rank(f"model.layers.{l}.mlp.down_proj") for l in layers] == [3, 3]
    # the target z_i = h_i + delta_i at the top layer is reached after both updates
    layout = layout_of(model)
    deltas = torch.stack([optimize_delta(model, tok, layout, 1, r, PREFIXES, PLAIN, anchor="hidden")[0]
                          for r in requests]).double()
    z = mean_at(model, tok, "model.layers.1", "output", requests, PREFIXES) + deltas
    edit.merge_into(model)
    reached = mean_at(model, tok, "model.layers.1", "output", requests, PREFIXES)
    torch.testing.assert_close(reached, z, rtol=1e-6, atol=1e-8)


def test_larger_lambda_keeps_the_corpus_outputs_closer(tok):
    model = micro_model("llama", dtype=torch.float64)
    stats = key_statistics(model, tok, 1, corpus=CORPUS, cache=False)
    requests = [REQUEST] + OTHERS
    moved = []
    for lam in (1e-3, 1e3):
        edit = memit(model, tok, requests, [1], stats={1: stats}, prefixes=PREFIXES, settings=PLAIN, mom2_weight=lam)
        d = edit.delta_weight("model.layers.1.mlp.down_proj")
        moved.append(float(torch.trace(d @ stats.mom2 @ d.t())))       # E ||Delta k||^2 over corpus keys
    assert moved[1] < moved[0]


def test_sequential_rome_equals_editing_one_after_another(tok):
    import copy

    from peftkern.editing import combine, rome_sequential

    model = micro_model("llama", dtype=torch.float64)
    stats = key_statistics(model, tok, 1, corpus=CORPUS, cache=False)
    both = rome_sequential(model, tok, [REQUEST, OTHERS[0]], 1, stats=stats, prefixes=PREFIXES, settings=PLAIN)
    first = rome(model, tok, REQUEST, 1, stats=stats, prefixes=PREFIXES, settings=PLAIN)
    after = copy.deepcopy(model)
    first.merge_into(after)
    second = rome(after, tok, OTHERS[0], 1, stats=stats, prefixes=PREFIXES, settings=PLAIN)
    name = "model.layers.1.mlp.down_proj"
    assert both.rank(name) == 2 and both.method == "rome-sequential"
    torch.testing.assert_close(both.delta_weight(name), combine([first, second]).delta_weight(name),
                               rtol=1e-7, atol=1e-10)
