"""The Qwen3 family's `model` section (the dense models): the shared keys with Qwen3's
defaults, a head size of its own (`head_dim`, 128 in the released models, not width / heads),
and per-head query and key RMSNorm before rotary."""

from dataclasses import dataclass
from typing import ClassVar

from pjit_llm.models.decoder_config import DecoderConfig


@dataclass(frozen=True)
class Qwen3Config(DecoderConfig):
    family: str = "qwen3"
    rope_theta: float = 1000000.0
    norm_eps: float = 1e-6
    qk_norm: ClassVar[bool] = True
