"""Decoding over any transformers causal LM, with or without peftkern adapters: a KV-cached loop that
gives transformers' ``generate`` tokens, sampling processors, rule constraints, contrastive decoding
and classifier guidance. See docs/generate.md."""
from peftkern.generate.forward import ModelStepper, context_length
from peftkern.generate.loop import DecodeOutput, decode, inverse_cdf_draw
from peftkern.generate.processors import MinP, RepetitionPenalty, Temperature, TopK, TopP, build_processors
from peftkern.generate.prompts import PromptError, encode_prompt, left_pad, read_prompt_file
from peftkern.generate.settings import DecodingSettings
from peftkern.generate.text import Completion, generate, generate_text

__all__ = ["DecodingSettings", "generate", "generate_text", "Completion", "decode", "inverse_cdf_draw", "DecodeOutput", "ModelStepper",
           "context_length", "RepetitionPenalty", "Temperature", "TopK", "TopP", "MinP", "build_processors",
           "PromptError", "encode_prompt", "left_pad", "read_prompt_file"]
