"""Prefix tuning: a trainable key/value prefix in every attention layer's cache (PEFT's PREFIX_TUNING)."""
from peftkern.tuners.prefix.config import PrefixTuningConfig
from peftkern.tuners.prefix.encoder import PrefixEncoder
from peftkern.tuners.prefix.tuner import PrefixTuningTuner

__all__ = ["PrefixTuningConfig", "PrefixEncoder", "PrefixTuningTuner"]
