"""The Gemma 3 family's `model` section (the text decoder): sliding-window local layers
interleaved with global ones, each kind with its rotary base, and the traits Gemma computes
with: RMSNorm scaled by (1 + weight), embeddings times sqrt(width), GeGLU with tanh GELU,
query/key norms, and scores scaled by query_pre_attn_scalar^-1/2."""

from dataclasses import dataclass
from typing import ClassVar

from pjit_llm.errors import UserError
from pjit_llm.models.decoder_config import DecoderConfig


@dataclass(frozen=True)
class Gemma3Config(DecoderConfig):
    family: str = "gemma3"
    rope_theta: float = 1000000.0  # global layers (with model.rope_scaling)
    norm_eps: float = 1e-6
    sliding_window: int = 512  # positions a local layer's query sees, itself included
    global_every: int = 6  # layer i is global when (i + 1) is a multiple: 5 local, 1 global
    rope_local_theta: float = 10000.0  # local layers' rotary base (never scaled)
    query_pre_attn_scalar: float = 256.0
    qk_norm: ClassVar[bool] = True
    norm_plus_one: ClassVar[bool] = True
    scale_embeddings: ClassVar[bool] = True
    mlp_activation: ClassVar[str] = "gelu_tanh"

    def local_layers(self) -> tuple[bool, ...]:
        return tuple((i + 1) % self.global_every != 0 for i in range(self.num_layers))

    @property
    def attention_scale(self) -> float:
        return self.query_pre_attn_scalar ** -0.5

    def validate(self) -> None:
        super().validate()
        for name in ("sliding_window", "global_every", "rope_local_theta", "query_pre_attn_scalar"):
            if getattr(self, name) <= 0:
                raise UserError(f"model.{name}={getattr(self, name)} must be positive")
