"""The Mixtral family's `model` section: the shared keys with Mixtral's defaults, and the
mixture-of-experts keys (models/moe_config.py); every layer's MLP is a mixture of experts of
width model.mlp_dim, the chosen experts' probabilities renormalised."""

from dataclasses import dataclass

from pjit_llm.models.moe_config import MoEConfig


@dataclass(frozen=True)
class MixtralConfig(MoEConfig):
    family: str = "mixtral"
    rope_theta: float = 1000000.0
