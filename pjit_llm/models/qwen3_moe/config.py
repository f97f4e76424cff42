"""The Qwen3-MoE family's `model` section: Qwen3's attention (its head size, query/key
norms, defaults) and the mixture-of-experts keys, the experts model.expert_mlp_dim wide
(config.json's moe_intermediate_size) and their probabilities renormalised only where
norm_topk_prob says so. Every layer is a mixture of experts; model.mlp_dim is config.json's
intermediate_size, kept for its round trip."""

from dataclasses import dataclass

from pjit_llm.models.moe_config import MoEConfig
from pjit_llm.models.qwen3.config import Qwen3Config


@dataclass(frozen=True)
class Qwen3MoeConfig(Qwen3Config, MoEConfig):  # Qwen3's defaults win
    family: str = "qwen3_moe"
    norm_topk_prob: bool = False
