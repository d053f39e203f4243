"""P-tuning: virtual tokens from a prompt encoder (MLP or LSTM), PEFT's P_TUNING."""
from peftkern.tuners.ptuning.config import PromptEncoderConfig
from peftkern.tuners.ptuning.encoder import PromptEncoder
from peftkern.tuners.ptuning.tuner import PTuningTuner

__all__ = ["PromptEncoderConfig", "PromptEncoder", "PTuningTuner"]
