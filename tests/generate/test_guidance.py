"""Classifier guidance raises the guiding score on held-out prompts (measured: mean over the prompts,
guided against unguided, same model and settings), with a reward function and with a transformers
sequence classifier; and it runs inside transformers' generate."""
import pytest
import torch
import transformers as tf

from peftkern.generate import DecodingSettings, generate
from peftkern.generate.guidance import ClassifierGuidance, classifier_scorer, text_scorer
from peftkern.models import build_byte_tokenizer, build_tiny_model
from peftkern.models.tiny import PAD_ID

PROMPTS = [f"Tell me about item {i}." for i in range(12)]  # none of them seen by any model here


def upper_share(prompt: str, text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / max(len(letters), 1)


def _mean(values):
    return sum(values) / len(values)


def test_reward_function_guidance_raises_the_reward():
    model, tok = build_tiny_model("micro", seed=4).eval(), build_byte_tokenizer()
    settings = DecodingSettings(max_new_tokens=12, do_sample=True, temperature=1.0, seed=0)
    plain = generate(model, tok, PROMPTS, settings, chat=True)
    guide = ClassifierGuidance(text_scorer(upper_share, tok), weight=5.0, top_k=20, pad_token_id=PAD_ID)
    guided = generate(model, tok, PROMPTS, settings, chat=True, processors=[guide])
    before = _mean([upper_share("", c.text) for c in plain])
    after = _mean([upper_share("", c.text) for c in guided])
    assert after > before + 0.3, (before, after)


def test_classifier_guidance_raises_the_classifier_log_prob():
    model, tok = build_tiny_model("micro", seed=4).eval(), build_byte_tokenizer()
    config = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=2, num_labels=2, pad_token_id=PAD_ID)
    torch.manual_seed(0)
    classifier = tf.LlamaForSequenceClassification(config).eval()
    scorer = classifier_scorer(classifier, tok, label=1)
    settings = DecodingSettings(max_new_tokens=10)
    plain = generate(model, tok, PROMPTS, settings, chat=True)
    guided = generate(model, tok, PROMPTS, settings, chat=True,
                      processors=[ClassifierGuidance(scorer, weight=1.0, top_k=8, pad_token_id=PAD_ID)])

    def mean_score(outs):
        return scorer([[]] * len(outs), [c.token_ids for c in outs]).mean().item()

    before, after = mean_score(plain), mean_score(guided)
    assert after > before + 0.05, (before, after)


def test_guidance_inside_transformers_generate():
    model, tok = build_tiny_model("micro", seed=4).eval(), build_byte_tokenizer()
    guide = ClassifierGuidance(text_scorer(upper_share, tok), weight=50.0, top_k=5, pad_token_id=PAD_ID)
    enc = tok(["hello"], return_tensors="pt")
    out = model.generate(**enc, logits_processor=[guide], max_new_tokens=6, do_sample=False,
                         pad_token_id=PAD_ID)[0, enc["input_ids"].shape[1]:]
    ours = generate(model, tok, ["hello"], max_new_tokens=6, processors=[guide])[0]
    assert out.tolist()[:len(ours.token_ids)] == ours.token_ids


def test_bad_weight_and_top_k_are_named():
    for weight in (float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="guidance weight must be a finite number"):
            ClassifierGuidance(lambda p, c: [0.0] * len(c), weight=weight)
    with pytest.raises(ValueError, match="guidance top_k must be a positive integer"):
        ClassifierGuidance(lambda p, c: [0.0] * len(c), top_k=0)
