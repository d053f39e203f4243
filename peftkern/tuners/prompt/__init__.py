"""Prompt tuning: trainable virtual-token embeddings before the input (PEFT's PROMPT_TUNING)."""
from peftkern.tuners.prompt.config import PromptTuningConfig
from peftkern.tuners.prompt.encoder import PromptEmbedding
from peftkern.tuners.prompt.tuner import PromptTuningTuner

__all__ = ["PromptTuningConfig", "PromptEmbedding", "PromptTuningTuner"]
