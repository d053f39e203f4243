"""SFT cross-entropy, fused from hidden states, against torch's cross_entropy on full logits."""
import pytest
import torch
import torch.nn.functional as F

from peftkern import backend, losses
from peftkern.nn import LoRALinear
from tests.helpers import assert_close

FACES = [f for f in ("torch", "triton") if backend.available("cpu")[f]]


def _batch(N=29, H=24, V=130):
    hidden = torch.randn(N, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64) * 0.4
    bias = torch.randn(V, dtype=torch.float64)
    targets = torch.randint(0, V, (N,))
    targets[::3] = -100
    return hidden, weight, bias, targets


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_fused_sft_matches_cross_entropy(seed, face, reduction, label_smoothing):
    hidden, weight, bias, targets = _batch()
    params = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    expected = F.cross_entropy(params[0] @ params[1].t() + params[2], targets, reduction=reduction,
                               label_smoothing=label_smoothing)
    probe = torch.randn_like(expected)
    g_expected = torch.autograd.grad((expected * probe).sum(), params)
    mine = [t.float().requires_grad_(True) for t in (hidden, weight, bias)]
    with backend.use(face):
        loss = losses.fused_sft_loss(mine[0], mine[1], targets, reduction=reduction, label_smoothing=label_smoothing,
                                     bias=mine[2], chunk_size=7)
    assert loss.dtype == torch.float32
    assert_close(loss, expected.detach(), torch.float32, "loss")
    for got, exp, name in zip(torch.autograd.grad((loss * probe.float()).sum(), mine), g_expected, "hwb"):
        assert_close(got, exp, torch.float32, f"d{name}")


def test_sft_loss_from_logps_and_num_items(seed):
    hidden, weight, _, targets = _batch()
    logits = (hidden @ weight.t()).float()
    logp = torch.log_softmax(logits, -1)
    mask = targets != -100
    token = torch.where(mask, logp.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1), 0.0)
    mean = torch.where(mask, logp.mean(-1), 0.0)
    expected = F.cross_entropy(logits, targets, label_smoothing=0.2)
    assert_close(losses.sft_loss(token, mask, label_smoothing=0.2, token_mean_logps=mean), expected,
                 torch.float32, "from logps")
    fused = losses.fused_sft_loss(hidden.float(), weight.float(), targets, num_items_in_batch=100)
    assert_close(fused, F.cross_entropy(logits, targets, reduction="sum") / 100, torch.float32, "num_items")
    with pytest.raises(ValueError, match="token_mean_logps"):
        losses.sft_loss(token, mask, label_smoothing=0.1)
    with pytest.raises(ValueError, match="reduction"):
        losses.fused_sft_loss(hidden.float(), weight.float(), targets, reduction="max")


def test_lora_head_is_not_ignored(seed):
    """A LoRA on the output head reaches the fused loss through head_parameters, gradients included."""
    torch.manual_seed(seed)
    head = LoRALinear.from_linear(torch.nn.Linear(16, 40), r=4, lora_alpha=8)
    torch.nn.init.normal_(head.lora_B["default"].weight)
    hidden = torch.randn(11, 16)
    targets = torch.randint(0, 40, (11,))
    expected = F.cross_entropy(head(hidden), targets)
    expected.backward()
    want = [p.grad.clone() for p in (head.lora_A["default"].weight, head.lora_B["default"].weight)]
    head.zero_grad()
    loss = losses.fused_sft_loss(hidden, targets=targets, **losses.head_parameters(head))
    loss.backward()
    assert_close(loss, expected.detach(), torch.float32, "loss")
    for p, w in zip((head.lora_A["default"].weight, head.lora_B["default"].weight), want):
        assert_close(p.grad, w, torch.float32, "lora grad")
    head.update_layer("second", r=2, lora_alpha=2)
    head.set_adapter(["default", "second"])
    with pytest.raises(ValueError, match="2 active LoRA adapters"):
        losses.head_parameters(head)
    with pytest.raises(TypeError, match="nn.Linear"):
        losses.head_parameters(torch.nn.Conv1d(3, 3, 1))


def test_head_parameters_reads_peft_lora(seed):
    peft = pytest.importorskip("peft")
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 30))
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["1"], init_lora_weights=False)
    wrapped = peft.get_peft_model(model, config)
    head = wrapped.base_model.model[1]
    hidden, targets = torch.randn(5, 8), torch.randint(0, 30, (5,))
    expected = F.cross_entropy(head(hidden), targets)
    loss = losses.fused_sft_loss(hidden, targets=targets, **losses.head_parameters(head))
    assert_close(loss, expected.detach(), torch.float32, "peft head")
