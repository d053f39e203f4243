"""P-tuning against the real peft: the MLP and LSTM prompt encoders, PEFT's files both ways (the
encoder's output folded into the file, as PEFT saves it) with PEFT's logits, PEFT's gradients
through the encoder, greedy tokens, refusals."""
import pytest

from peftkern import PromptEncoderConfig
from tests.tuners import soft_prompts as checks
from tests.tuners.tiny_models import FAMILIES, tiny_model

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def configs(kind="MLP", n=4, **kw):
    kw = dict(num_virtual_tokens=n, task_type="CAUSAL_LM", encoder_reparameterization_type=kind,
              encoder_hidden_size=12, **kw)
    return peft.PromptEncoderConfig(**kw), PromptEncoderConfig(**kw)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_files_both_ways_with_peft(tmp_path, family, kind):
    checks.check_files_both_ways(tmp_path, tiny_model(family), *configs(kind))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_training_loss_and_gradients_match_peft(family, kind):
    extra = dict(encoder_num_layers=2, encoder_dropout=0.1) if kind == "LSTM" else {}
    checks.check_training_matches_peft(tiny_model(family), *configs(kind, **extra))


@pytest.mark.parametrize("family", ["qwen2"])
def test_greedy_generate_gives_pefts_tokens(family):
    checks.check_greedy_generate(tiny_model(family), *configs("LSTM"))


def test_model_level_behaviour():
    checks.check_model_level_behaviour(tiny_model("mistral"), configs()[1])


def test_bad_input():
    checks.check_bad_input_leaves_model(tiny_model("qwen2"), lambda **kw: PromptEncoderConfig(**kw),
                                        dict(token_dim=16), "token_dim = 16 but .* input embeddings are 32 wide")
    with pytest.raises(ValueError, match="encoder_reparameterization_type must be one of"):
        PromptEncoderConfig(num_virtual_tokens=2, encoder_reparameterization_type="GRU")
    with pytest.raises(ValueError, match="encoder_dropout must be"):
        PromptEncoderConfig(num_virtual_tokens=2, encoder_dropout=1.0)
