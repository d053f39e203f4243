"""NF4Linear, QLoRA (LoRA on an NF4 base, through LoRALinear and get_peft_model), quantize_model,
bitsandbytes checkpoints both ways, merge + requantize, the quantize CLI, a tiny QLoRA training run."""
import json
import os

import pytest
import torch
from torch import nn

from peftkern import backend
from peftkern.nn.lora import LoRALinear
from peftkern.nn.nf4 import NF4Linear, merge_nf4_lora, quantize_model
from peftkern.quant import quantize_nf4
from tests.helpers import RTOL, rel_error


def _linear(k=64, n=48, bias=True, dtype=torch.float32):
    lin = nn.Linear(k, n, bias=bias).to(dtype)
    with torch.no_grad():
        lin.weight.normal_(0, k**-0.5)
        if bias:
            lin.bias.normal_()
    return lin


def test_nf4_linear_forward_matches_dequantized_linear(seed):
    lin = _linear()
    layer = NF4Linear.from_linear(lin, blocksize=64, double_quant=True)
    x = torch.randn(5, 7, 64, requires_grad=True)
    y = layer(x)
    w = layer.dequantize(torch.float32)
    assert torch.equal(w, quantize_nf4(lin.weight, 64).dequantize(torch.float32))
    expected = x.detach() @ w.t() + lin.bias
    assert rel_error(y, expected) <= RTOL[torch.float32]
    y.sum().backward()
    assert rel_error(x.grad, torch.ones(5, 7, 48) @ w) <= RTOL[torch.float32]
    assert not layer.weight.requires_grad and layer.weight.dtype == torch.uint8
    with torch.no_grad():
        assert rel_error(layer(x), lin(x)) < 0.15  # NF4's own error, not a bug's
    half = NF4Linear.from_linear(lin, compute_dtype=torch.bfloat16)
    assert half(x).dtype == torch.float32  # computed in bf16, returned in x's dtype


def test_from_linear_rejects_bad_input():
    with pytest.raises(TypeError, match="nn.Linear"):
        NF4Linear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="blocksize"):
        NF4Linear.from_linear(_linear(), blocksize=100)
    lin = _linear()
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        NF4Linear.from_linear(lin)


@pytest.mark.peers
def test_from_bnb_linear4bit_and_state_dict_both_ways(seed):
    bnb = pytest.importorskip("bitsandbytes")
    lin = _linear(64, 32, dtype=torch.bfloat16)
    q = bnb.nn.Linear4bit(64, 32, bias=True, compute_dtype=torch.bfloat16, compress_statistics=True,
                          quant_type="nf4")
    q.load_state_dict(lin.state_dict())
    q = q.to("cpu")  # Linear4bit quantizes on its move to a device
    assert q.weight.quant_state is not None
    ours = NF4Linear.from_bnb(q)
    assert torch.equal(ours.weight, NF4Linear.from_linear(lin).weight)  # same bytes as quantizing ourselves
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert rel_error(ours(x), q(x)) <= 2e-2
    # our state dict -> a fresh bnb layer
    sd = ours.state_dict()
    assert sd["weight"].dtype == torch.uint8 and "weight.quant_state.bitsandbytes__nf4" in sd
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    param = bnb.nn.Params4bit.from_prequantized(data=sd["weight"], quantized_stats=stats, requires_grad=False,
                                                device="cpu")
    assert torch.equal(bnb.functional.dequantize_4bit(param.data, param.quant_state), ours.dequantize())
    # bnb's state dict -> a fresh NF4Linear
    fresh = NF4Linear.from_linear(_linear(64, 32, dtype=torch.bfloat16))
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.dequantize(), ours.dequantize())


@pytest.mark.parametrize("face", ["torch", "triton"])
def test_qlora_layer_is_one_fused_call_and_matches_reference(seed, face):
    base = NF4Linear.from_linear(_linear(64, 48))
    layer = LoRALinear.from_linear(base, r=4, lora_alpha=8)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(10, 64, requires_grad=True)
    with backend.use(face):
        y = layer(x)
    y.square().sum().backward()
    w = base.dequantize(torch.float32)
    a = layer.lora_A["default"].weight.detach().requires_grad_()
    b = layer.lora_B["default"].weight.detach().requires_grad_()
    x2 = x.detach().requires_grad_()
    y_ref = x2 @ w.t() + base.bias + 2.0 * (x2 @ a.t()) @ b.t()
    y_ref.square().sum().backward()
    assert rel_error(y, y_ref) <= RTOL[torch.float32]
    assert rel_error(x.grad, x2.grad) <= 2 * RTOL[torch.float32]
    assert rel_error(layer.lora_A["default"].weight.grad, a.grad) <= 2 * RTOL[torch.float32]
    assert rel_error(layer.lora_B["default"].weight.grad, b.grad) <= 2 * RTOL[torch.float32]


def test_merge_requantize_reports_error_and_16bit_option(seed):
    def make():
        torch.manual_seed(0)
        model = nn.Sequential(_linear(64, 64), nn.ReLU(), _linear(64, 32))
        quantize_model(model, skip_output_head=False)
        model[0] = LoRALinear.from_linear(model[0], r=4, lora_alpha=4)
        with torch.no_grad():
            model[0].lora_B["default"].weight.normal_(0, 0.1)
        return model

    x = torch.randn(8, 64)
    model = make()
    with torch.no_grad():
        before = model(x)
    merged16, errors16 = merge_nf4_lora(make(), requantize=False)
    assert isinstance(merged16[0], nn.Linear) and errors16 == {"0": 0.0}
    with torch.no_grad():
        assert rel_error(merged16(x), before) <= 1e-5
    merged4, errors4 = merge_nf4_lora(make(), requantize=True)
    assert isinstance(merged4[0], NF4Linear) and 0.0 < errors4["0"] < 0.2
    with torch.no_grad():
        assert rel_error(merged4(x), before) < 0.2
    # LoRALinear.merge on an NF4 base goes through the same requantization
    layer = make()[0]
    layer.merge()
    with torch.no_grad():
        assert rel_error(layer(x), make()[0](x)) < 0.2


def _tiny_llama(tmp_path=None):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float()
    if tmp_path is not None:
        model.save_pretrained(tmp_path, safe_serialization=True)
    return model


def test_quantize_model_skips_head_and_get_peft_model_trains_lora_only(seed):
    tuners = pytest.importorskip("peftkern.tuners")
    model = quantize_model(_tiny_llama())
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    assert kinds["lm_head"] == "Linear" and kinds["model.layers.0.self_attn.q_proj"] == "NF4Linear"
    assert sum(v == "NF4Linear" for v in kinds.values()) == 14
    peft_model = tuners.get_peft_model(model, tuners.LoraConfig(r=4, lora_alpha=8,
                                                                target_modules=["q_proj", "v_proj", "down_proj"]))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.randint(0, 64, (2, 12))
    out = peft_model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_tiny_qlora_trains_like_lora_on_the_same_base(seed):
    """QLoRA (NF4 base, fused op) and LoRA on a bf16-free float copy of dequant(W4) follow one loss
    curve; LoRA on the original (unquantized) base follows a close one."""
    torch.manual_seed(0)
    dense = nn.Sequential(_linear(32, 64), nn.GELU(), _linear(64, 64), nn.GELU(), _linear(64, 8))
    data = [(torch.randn(16, 32), torch.randint(0, 8, (16,))) for _ in range(4)]

    def train(model):
        torch.manual_seed(1)
        for i in (0, 2):
            model[i] = LoRALinear.from_linear(model[i], r=4, lora_alpha=8)
            nn.init.normal_(model[i].lora_B["default"].weight, std=0.01)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=3e-2)
        losses = []
        for step in range(10):
            x, t = data[step % 4]
            loss = nn.functional.cross_entropy(model(x), t)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    import copy
    qlora_model = quantize_model(copy.deepcopy(dense), skip_output_head=True)
    qlora_model[4] = copy.deepcopy(dense[4])  # the head stays dense in both
    same_base = copy.deepcopy(dense)
    for i in (0, 2):
        with torch.no_grad():
            same_base[i].weight.copy_(qlora_model[i].dequantize(torch.float32))
    q = train(qlora_model)
    s = train(same_base)
    d = train(copy.deepcopy(dense))
    assert q[-1] < 0.7 * q[0]
    assert max(abs(a - b) / b for a, b in zip(q, s)) < 1e-3
    assert max(abs(a - b) / b for a, b in zip(q, d)) < 0.1


def test_transformers_bnb_checkpoint_and_cli_round_trip(tmp_path, seed):
    pytest.importorskip("transformers")
    from peftkern.cli import main
    from peftkern.nn.nf4 import load_pretrained_nf4

    src, out = tmp_path / "src", tmp_path / "out"
    dense = _tiny_llama(src)
    assert main(["quantize", str(src), str(out), "--no-progress"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    assert config["quantization_config"]["llm_int8_skip_modules"] is None  # transformers' default: the head stays 16-bit
    loaded = load_pretrained_nf4(str(out))
    expected = quantize_model(_tiny_llama(), compute_dtype=torch.bfloat16)
    assert type(loaded.model.layers[1].mlp.up_proj).__name__ == "NF4Linear"
    ids = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        a, b, c = loaded(ids).logits, expected(ids).logits, dense(ids).logits
    assert torch.equal(a, b)
    assert rel_error(a, c) < 0.2
    assert os.path.getsize(out / "model.safetensors") < 0.6 * os.path.getsize(src / "model.safetensors")


@pytest.mark.peers
def test_transformers_bitsandbytes_checkpoint_loads(tmp_path, seed):
    """A checkpoint transformers saves from a model loaded with BitsAndBytesConfig(load_in_4bit=True,
    nf4, double quant) loads into NF4Linear modules, bit-identical to quantizing the source ourselves."""
    pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    from peftkern.nn.nf4 import load_pretrained_nf4

    _tiny_llama(tmp_path / "src")
    bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True,
                                                 bnb_4bit_compute_dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src", quantization_config=bnb_config,
                                                               device_map="cpu")
    assert type(theirs.model.layers[0].mlp.gate_proj).__name__ == "Linear4bit"
    theirs.save_pretrained(tmp_path / "q")
    loaded = load_pretrained_nf4(str(tmp_path / "q"))
    assert type(loaded.model.layers[0].mlp.gate_proj).__name__ == "NF4Linear"
    ours = quantize_model(_tiny_llama())
    for name, module in ours.named_modules():
        if isinstance(module, NF4Linear):
            other = loaded.get_submodule(name)
            assert torch.equal(other.weight, module.weight) and torch.equal(other.absmax, module.absmax), name
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ours(ids).logits)
        assert rel_error(loaded(ids).logits, theirs(ids).logits) < 2e-2  # bnb's CPU matmul rounds x to bf16
