"""GPT-2 model and FLOP accounting."""

from model.gpt import GPT, PRESETS, GPTConfig

__all__ = ["GPT", "GPTConfig", "PRESETS"]
