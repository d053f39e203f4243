"""DoRALinear against the real peft (use_dora=True): adapters move both ways with PEFT's keys, give
PEFT's logits and PEFT's gradients, on a dense base and on a 4-bit NF4 base (bitsandbytes)."""
import copy

import pytest
import torch
from torch import nn

from peftkern import backend
from peftkern.nn.dora import DoRALinear, nf4_rows
from peftkern.ops.dora import FACES
from tests.helpers import rel_error

peft = pytest.importorskip("peft")

DEVICE = "cpu"
RUNNABLE_FACES = [f for f in FACES if backend.why_unavailable(f, DEVICE) is None]
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(1234)
    return LlamaForCausalLM(config).eval()


def _peft_dora(model, dropout=0.0):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, lora_dropout=dropout,
                             init_lora_weights=False)
    return peft.get_peft_model(model, config)


def _peft_layers(peft_model):
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}


def _ours_like(peft_model, base_model):
    """base_model with every layer PEFT adapted swapped for a DoRALinear holding PEFT's state dict
    (strict load: the keys map one to one)."""
    ours = copy.deepcopy(base_model)
    for p in ours.parameters():
        p.requires_grad_(False)
    for name, layer in _peft_layers(peft_model).items():
        parent, attr = ours.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
        module = DoRALinear(getattr(parent, attr))
        module.update_layer("default", 4, 8, layer.lora_dropout["default"].p
                            if isinstance(layer.lora_dropout["default"], nn.Dropout) else 0.0)
        module.set_adapter("default")
        module.load_state_dict(layer.state_dict(), strict=True)
        setattr(parent, attr, module)
    return ours


def _train_steps(model, steps=3, lr=0.05):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(7))
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()


IDS = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(3))


def test_state_dict_keys_are_peft_keys(seed):
    base = nn.Linear(12, 7)
    theirs = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)),
                                 peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"], use_dora=True))
    ours = DoRALinear.from_linear(copy.deepcopy(base), r=2, lora_alpha=4)
    assert set(ours.state_dict()) == set(theirs.base_model.model[0].state_dict())
    assert "lora_magnitude_vector.default.weight" in ours.state_dict()


def test_magnitude_starts_as_peft_initializes_it(seed):
    """init_lora_weights=False leaves B non-zero: m = ||W + s B A||_row at creation."""
    base = nn.Linear(30, 17)
    theirs = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)),
                                 peft.LoraConfig(r=3, lora_alpha=5, target_modules=["0"], use_dora=True,
                                                 init_lora_weights=False)).base_model.model[0]
    ours = DoRALinear(copy.deepcopy(base))
    ours.update_layer("default", 3, 5, init_lora_weights=False)
    with torch.no_grad():
        ours.lora_A["default"].weight.copy_(theirs.lora_A["default"].weight)
        ours.lora_B["default"].weight.copy_(theirs.lora_B["default"].weight)
    expected = theirs.lora_magnitude_vector["default"].weight
    assert rel_error(ours.weight_norm("default"), expected) < 1e-6
    fresh = DoRALinear.from_linear(copy.deepcopy(base), r=3, lora_alpha=5)  # B = 0: m = ||W||_row
    assert rel_error(fresh.lora_magnitude_vector["default"].weight, base.weight.norm(dim=1)) < 1e-6


@pytest.mark.parametrize("face", RUNNABLE_FACES)
def test_peft_trained_adapter_gives_peft_logits_and_gradients(face, seed):
    base = _tiny_llama()
    theirs = _peft_dora(copy.deepcopy(base))
    _train_steps(theirs)  # a real adapter: B and m moved away from their init
    theirs.eval()
    ours = _ours_like(theirs, base).eval()
    with backend.use(face), torch.no_grad():
        ours_logits = ours(input_ids=IDS).logits
    with torch.no_grad():
        peft_logits = theirs(input_ids=IDS).logits
    assert rel_error(ours_logits, peft_logits) < 1e-5

    # gradients of every adapter parameter (A, B, magnitude) equal PEFT's
    theirs.train()
    ours.train()
    theirs.zero_grad()
    theirs(input_ids=IDS, labels=IDS).loss.backward()
    with backend.use(face):
        ours(input_ids=IDS, labels=IDS).loss.backward()
    peft_params = {n.replace("base_model.model.", ""): p for n, p in theirs.named_parameters() if p.requires_grad}
    our_params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert set(peft_params) == set(our_params) and any("lora_magnitude_vector" in n for n in our_params)
    for name, p in our_params.items():
        assert p.grad is not None, name
        assert rel_error(p.grad, peft_params[name].grad) < 1e-4, name


def test_our_trained_adapter_gives_the_same_logits_in_peft(seed):
    base = _tiny_llama()
    theirs = _peft_dora(copy.deepcopy(base))
    ours = _ours_like(theirs, base)
    _train_steps(ours)
    for name, layer in _peft_layers(theirs).items():
        layer.load_state_dict(ours.get_submodule(name).state_dict(), strict=True)
    with torch.no_grad():
        assert rel_error(ours.eval()(input_ids=IDS).logits, theirs.eval()(input_ids=IDS).logits) < 1e-5


def test_dropout_in_eval_mode_matches_peft(seed):
    base = _tiny_llama()
    theirs = _peft_dora(copy.deepcopy(base), dropout=0.3)
    ours = _ours_like(theirs, base)
    with torch.no_grad():
        assert rel_error(ours.eval()(input_ids=IDS).logits, theirs.eval()(input_ids=IDS).logits) < 1e-5


def test_merge_and_unmerge_match_peft(seed):
    base = nn.Linear(24, 10)
    theirs = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)),
                                 peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0"], use_dora=True,
                                                 init_lora_weights=False)).base_model.model[0]
    with torch.no_grad():
        theirs.lora_magnitude_vector["default"].weight.mul_(torch.rand(10) + 0.5)
    ours = DoRALinear(copy.deepcopy(base))
    ours.update_layer("default", 3, 6)
    ours.set_adapter("default")
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(6, 24)
    before = ours(x).detach()
    ours.merge()
    theirs.merge()
    assert rel_error(ours.base_layer.weight, theirs.base_layer.weight) < 1e-6
    assert rel_error(ours(x), before) < 1e-5
    ours.unmerge()
    assert rel_error(ours.base_layer.weight, base.weight) < 1e-5
    assert rel_error(ours(x), before) < 1e-5


def test_gpt2_conv1d_base_matches_peft(seed):
    from transformers.pytorch_utils import Conv1D

    base = Conv1D(nf=14, nx=20)
    nn.init.normal_(base.weight, std=0.2)
    nn.init.normal_(base.bias)
    theirs = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)),
                                 peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"], use_dora=True,
                                                 fan_in_fan_out=True, init_lora_weights=False)).base_model.model[0]
    ours = DoRALinear(copy.deepcopy(base))
    assert ours.fan_in_fan_out
    ours.update_layer("default", 2, 4)
    ours.set_adapter("default")
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 5, 20)
    assert rel_error(ours(x), theirs(x)) < 1e-5


# ---- NF4 base --------------------------------------------------------------------------------

def _bnb_linear4bit(linear):
    bnb = pytest.importorskip("bitsandbytes")
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q.to("cpu")


class _NF4Base(nn.Module):
    """A minimal module holding an NF4Weight, as a 4-bit base layer does."""

    def __init__(self, w4, bias):
        super().__init__()
        self.weight = w4
        self.bias = bias
        self.out_features, self.in_features = w4.shape

    def forward(self, x):
        from peftkern.ops.nf4 import nf4_linear

        return nf4_linear(x, self.weight, self.bias)


def _nf4_base_from_bnb(q):
    from peftkern.quant.nf4 import NF4Weight

    w4 = NF4Weight.from_bnb(q.weight.data, q.weight.quant_state)
    bias = nn.Parameter(q.bias.data.clone(), requires_grad=False) if q.bias is not None else None
    try:
        from peftkern.nn.nf4 import NF4Linear
    except ImportError:
        return _NF4Base(w4, bias)
    return NF4Linear(w4, bias)


def test_nf4_rows_decode_the_codes(seed):
    from peftkern.quant.nf4 import quantize_nf4

    w = torch.randn(9, 70)  # rows straddle 64-element blocks and odd byte boundaries
    w4 = quantize_nf4(w, blocksize=64, double_quant=True)
    full = w4.dequantize(torch.float32)
    absmax = w4.absmax_fp32()
    for start, stop in ((0, 9), (1, 4), (3, 8), (8, 9)):
        torch.testing.assert_close(nf4_rows(w4, absmax, start, stop), full[start:stop], rtol=0, atol=0)


def test_nf4_base_matches_peft_on_bnb_linear4bit(seed):
    pytest.importorskip("bitsandbytes")
    linear = nn.Linear(64, 24)
    q = _bnb_linear4bit(linear)
    theirs = peft.get_peft_model(nn.Sequential(q), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["0"], use_dora=True, init_lora_weights=False)).base_model.model[0]
    with torch.no_grad():
        theirs.lora_magnitude_vector["default"].weight.mul_(torch.rand(24) + 0.5)
    ours = DoRALinear(_nf4_base_from_bnb(q))
    ours.update_layer("default", 4, 8)
    ours.set_adapter("default")
    state = {k: v for k, v in theirs.state_dict().items() if not k.startswith("base_layer.")}
    ours.load_state_dict(state, strict=False)
    x = torch.randn(5, 64)
    # the row norm from the 4-bit codes equals PEFT's (from its dequantized copy)
    a, b = theirs.lora_A["default"].weight, theirs.lora_B["default"].weight
    import bitsandbytes as bnb

    dense = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state)
    expected_norm = (dense + 2.0 * (b @ a)).norm(dim=1)
    assert rel_error(ours.weight_norm("default"), expected_norm) < 1e-6
    y_ours, y_peft = ours(x), theirs(x)
    assert rel_error(y_ours, y_peft) < 1e-5
    dy = torch.randn_like(y_ours)
    y_ours.backward(dy)
    y_peft.backward(dy)
    for table in ("lora_A", "lora_B", "lora_magnitude_vector"):
        ours_p = getattr(ours, table)["default"].weight
        peft_p = getattr(theirs, table)["default"].weight
        assert rel_error(ours_p.grad, peft_p.grad) < 1e-5, table

    # and back: our trained state loads into PEFT's 4-bit layer with the same output
    with torch.no_grad():
        for table in ("lora_A", "lora_B", "lora_magnitude_vector"):
            getattr(ours, table)["default"].weight.add_(0.01 * torch.randn_like(getattr(ours, table)["default"].weight))
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("base_layer.")},
                           strict=False)
    assert rel_error(ours(x), theirs(x)) < 1e-5

    # merged into the 4-bit weight (requantized): the output moves by NF4's rounding only
    if hasattr(ours.base_layer, "set_weight"):
        with torch.no_grad():
            before = ours(x)
            ours.merge()
            merged = ours(x)
            ours.unmerge()
        assert rel_error(merged, before) < 0.2  # NF4 rounds a random weight by ~10%


# ---- PEFT's adapter files, through peftkern.tuners -------------------------------------------

def test_peft_files_both_ways(tmp_path, seed):
    tuners = pytest.importorskip("peftkern.tuners")
    base = _tiny_llama()
    theirs = _peft_dora(copy.deepcopy(base))
    _train_steps(theirs)
    theirs.save_pretrained(tmp_path / "from_peft")
    ours = tuners.load_adapter(copy.deepcopy(base), tmp_path / "from_peft")
    assert any(isinstance(m, DoRALinear) for m in ours.modules())
    with torch.no_grad():
        expected = theirs.eval()(input_ids=IDS).logits
        assert rel_error(ours.eval()(input_ids=IDS).logits, expected) < 1e-5
    tuners.save_adapter(ours, tmp_path / "from_ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "from_ours").eval()
    with torch.no_grad():
        assert rel_error(back(input_ids=IDS).logits, expected) < 1e-5


# ---- issue 28 (10, 13) ----------------------------------------------------------------------

def test_norm_follows_edits_through_weight_data(seed):
    """``weight.data.mul_()`` bumps no version counter: the row norm must still follow the edit."""
    base = nn.Linear(16, 12)
    layer = DoRALinear.from_linear(copy.deepcopy(base), r=4, lora_alpha=8)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(5, 16)
    layer(x)
    for edit in (lambda w: w.data.mul_(1.7), lambda w: w.data.copy_(torch.randn_like(w))):
        edit(layer.base_layer.weight)
        w = layer.base_layer.weight
        delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        scale = layer.lora_magnitude_vector["default"].weight / (w + delta).norm(dim=1)
        expected = scale * (x @ (w + delta).t()) + layer.base_layer.bias
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_two_active_dora_adapters_match_peft(seed):
    """PEFT 0.21.2 rescales the running result with each further adapter's magnitude."""
    base = _tiny_llama()
    config = dict(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=TARGETS, **config),
                                 adapter_name="a")
    theirs.add_adapter("b", peft.LoraConfig(target_modules=["q_proj", "down_proj"], **config))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.2 * torch.rand_like(p))
    tuners = pytest.importorskip("peftkern.tuners")
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        theirs.save_pretrained(tmp)
        ours = tuners.load_adapter(copy.deepcopy(base), tmp, adapter_name="a")
        tuners.load_adapter(ours, f"{tmp}/b", adapter_name="b")
    theirs.base_model.set_adapter(["a", "b"])
    ours.set_adapter(["a", "b"])
    with torch.no_grad():
        expected = theirs.eval()(input_ids=IDS).logits
        single = copy.deepcopy(ours)
        single.set_adapter("a")
        assert rel_error(single(input_ids=IDS).logits, expected) > 1e-4  # b matters
        assert rel_error(ours.eval()(input_ids=IDS).logits, expected) < 1e-5
