"""LoRALinear: the drop-in module over nn.Linear and GPT-2 Conv1D."""
import copy
import math

import pytest
import torch
from torch import nn

from peftkern import backend
from peftkern.nn import LoRALinear
from peftkern.ops.lora import FACES
from tests.helpers import rel_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNNABLE_FACES = [f for f in FACES if backend.why_unavailable(f, DEVICE) is None]


def _randomize_adapter(module, name="default"):
    with torch.no_grad():
        module.lora_B[name].weight.normal_()


def test_from_linear_starts_as_the_base_layer(seed):
    base = nn.Linear(20, 12)
    module = LoRALinear.from_linear(copy.deepcopy(base), r=4, lora_alpha=8)
    x = torch.randn(3, 5, 20)
    torch.testing.assert_close(module(x), base(x))
    assert module.base_layer.weight.requires_grad is False and module.base_layer.bias.requires_grad is False
    assert module.lora_A["default"].weight.requires_grad and module.lora_B["default"].weight.requires_grad
    assert module.scaling["default"] == 2.0
    assert torch.count_nonzero(module.lora_B["default"].weight) == 0
    # Kaiming-uniform(a=sqrt(5)) on [r, in]: bound 1/sqrt(in)
    assert module.lora_A["default"].weight.abs().max() <= 1 / math.sqrt(20) + 1e-6


def test_rslora_scaling():
    module = LoRALinear.from_linear(nn.Linear(8, 8), r=16, lora_alpha=8, use_rslora=True)
    assert module.scaling["default"] == pytest.approx(8 / 4)


def test_matches_the_plain_formula(seed):
    base = nn.Linear(20, 12)
    module = LoRALinear.from_linear(copy.deepcopy(base), r=4, lora_alpha=6)
    _randomize_adapter(module)
    x = torch.randn(7, 20)
    a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
    expected = base(x) + 1.5 * (x @ a.t()) @ b.t()
    torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d_is_wrapped_with_fan_in_fan_out(seed):
    from transformers.pytorch_utils import Conv1D

    base = Conv1D(nf=12, nx=20)  # weight [in=20, out=12]
    nn.init.normal_(base.weight)
    nn.init.normal_(base.bias)
    module = LoRALinear.from_linear(copy.deepcopy(base), r=3, lora_alpha=3)
    assert module.fan_in_fan_out and (module.in_features, module.out_features) == (20, 12)
    _randomize_adapter(module)
    x = torch.randn(2, 4, 20)
    a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
    torch.testing.assert_close(module(x), base(x) + (x @ a.t()) @ b.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merge_unmerge_round_trip(dtype, seed):
    base = nn.Linear(32, 24).to(dtype)
    module = LoRALinear.from_linear(copy.deepcopy(base), r=8, lora_alpha=16)
    _randomize_adapter(module)
    x = torch.randn(5, 32, dtype=dtype)
    unmerged = module(x)
    module.merge()
    assert module.merged
    merged = module(x)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_error(merged, unmerged) < tol
    module.unmerge()
    assert not module.merged
    # W + delta is rounded to the dtype, then delta taken off again: the round trip costs up to about
    # one rounding of |W + delta|, which is large beside |W| when delta is (B here is N(0, 1), not zeros).
    ratio = module.delta_weight("default").norm().item() / base.weight.float().norm().item()
    unit = 1e-6 if dtype == torch.float32 else 2.0**-8
    assert rel_error(module.base_layer.weight, base.weight) < 2 * unit * (1.0 + ratio)


def test_matches_peft_lora_layer(seed):
    peft = pytest.importorskip("peft")
    base = nn.Sequential(nn.Linear(16, 16))
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    layer = peft_model.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    ours = LoRALinear.from_linear(copy.deepcopy(base[0]), r=4, lora_alpha=8)
    ours.load_state_dict({k: v for k, v in layer.state_dict().items()}, strict=True)
    x = torch.randn(6, 16)
    torch.testing.assert_close(ours(x), layer(x), rtol=1e-6, atol=1e-6)


def test_disable_and_multiple_adapters(seed):
    base = nn.Linear(10, 6)
    module = LoRALinear.from_linear(copy.deepcopy(base), r=2, lora_alpha=2)
    module.update_layer("other", r=3, lora_alpha=6)
    _randomize_adapter(module, "default")
    _randomize_adapter(module, "other")
    x = torch.randn(4, 10)
    module.set_adapter(["default", "other"])
    both = module(x)
    expected = base(x)
    for name in ("default", "other"):
        a, b = module.lora_A[name].weight, module.lora_B[name].weight
        expected = expected + module.scaling[name] * (x @ a.t()) @ b.t()
    torch.testing.assert_close(both, expected, rtol=1e-5, atol=1e-5)
    module.disable_adapters = True
    torch.testing.assert_close(module(x), base(x))


def test_extra_repr_names_the_adapter():
    text = repr(LoRALinear.from_linear(nn.Linear(8, 4), r=2, lora_alpha=4, lora_dropout=0.1))
    assert "in_features=8, out_features=4" in text and "default: r=2, alpha=4, scaling=2, dropout=0.1" in text


def test_bad_rank_is_an_error():
    with pytest.raises(ValueError, match="rank r must be a positive integer"):
        LoRALinear.from_linear(nn.Linear(8, 4), r=0, lora_alpha=4)


def _tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 5))


def _train(face, steps=10):
    model = _tiny_model()
    for i in (0, 2, 4):
        model[i] = LoRALinear.from_linear(model[i], r=4, lora_alpha=8)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.05)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 12, generator=gen)
    target = torch.randint(0, 5, (64,), generator=gen)
    losses = []
    with backend.use(face):
        for _ in range(steps):
            loss = nn.functional.cross_entropy(model(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


def test_tiny_model_trains_the_same_on_every_face():
    curves = {face: _train(face) for face in RUNNABLE_FACES}
    torch_curve = curves["torch"]
    assert torch_curve[-1] < 0.9 * torch_curve[0], f"no learning: {torch_curve}"
    for face, curve in curves.items():
        for step, (a, b) in enumerate(zip(curve, torch_curve)):
            assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), f"{face} diverges from torch at step {step}: {a} vs {b}"


# ---- issue 28 (16, 18): bad settings name the argument; merge skips adapters a layer lacks --------

@pytest.mark.parametrize("kwargs,exc,message", [
    (dict(lora_alpha="8"), TypeError, "lora_alpha must be a finite real number, got '8'"),
    (dict(lora_dropout="0.1"), TypeError, "lora_dropout must be a finite real number, got '0.1'"),
    (dict(lora_alpha=float("inf")), TypeError, "lora_alpha must be a finite real number"),
    (dict(r=True), ValueError, "rank r must be a positive integer, got True"),
    (dict(r=2.0), ValueError, "rank r must be a positive integer, got 2.0"),
    (dict(use_rslora="yes"), TypeError, "use_rslora must be a bool"),
    (dict(init_lora_weights="pissa"), ValueError, "init_lora_weights must be True, False or 'gaussian'"),
    (dict(adapter_name="a.b"), ValueError, "adapter_name must be a non-empty string without '.'"),
])
def test_from_linear_validates_every_setting_before_touching_the_base(kwargs, exc, message):
    base = nn.Linear(8, 4)
    settings = {"r": 2, "lora_alpha": 4, **kwargs}
    with pytest.raises(exc, match=message.replace("(", r"\(").replace(")", r"\)")):
        LoRALinear.from_linear(base, **settings)
    assert base.weight.requires_grad and base.bias.requires_grad  # untouched


def test_a_lora_layer_is_not_a_base_layer():
    layer = LoRALinear.from_linear(nn.Linear(8, 4), r=2, lora_alpha=4)
    with pytest.raises(TypeError, match="already a LoRALinear; add another adapter to it with update_layer"):
        LoRALinear.from_linear(layer, r=2, lora_alpha=4)
    with pytest.raises(TypeError, match="must be an nn.Module"):
        LoRALinear(torch.zeros(4, 8))


def test_merge_skips_active_adapters_the_layer_does_not_hold(seed):
    base = nn.Linear(10, 6)
    module = LoRALinear.from_linear(copy.deepcopy(base), r=2, lora_alpha=2)
    _randomize_adapter(module)
    module.active_adapters = ["default", "elsewhere"]  # "elsewhere" lives on other layers of the model
    x = torch.randn(3, 10)
    before = module(x)
    module.merge()
    assert module.merged_adapters == ["default"]
    torch.testing.assert_close(module(x), before, rtol=1e-5, atol=1e-5)
    module.unmerge()
    module.merge(["elsewhere"])
    assert not module.merged
