"""The Llama family's `model` section: the keys every family shares, as they are
(models/decoder_config.py)."""

from dataclasses import dataclass

from pjit_llm.models.decoder_config import DecoderConfig


@dataclass(frozen=True)
class LlamaConfig(DecoderConfig):
    family: str = "llama"
