"""The Qwen3-MoE family's `model` section: Qwen3's attention (its head size, query/key
norms, defaults) and the mixture-of-experts keys, the experts model.expert_mlp_dim wide
(config.json's moe_intermediate_size) and their probabilities renormalised only where
norm_topk_prob says so. As in transformers, layer i is a mixture of experts when (i + 1) is a
multiple of model.decoder_sparse_step and i is not in model.mlp_only_layers; the other
layers have a dense MLP model.mlp_dim wide (config.json's intermediate_size)."""

from dataclasses import dataclass

from pjit_llm.errors import UserError
from pjit_llm.models.moe_config import MoEConfig
from pjit_llm.models.qwen3.config import Qwen3Config


@dataclass(frozen=True)
class Qwen3MoeConfig(Qwen3Config, MoEConfig):  # Qwen3's defaults win
    family: str = "qwen3_moe"
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1  # every this many layers one is a mixture of experts
    mlp_only_layers: tuple[int, ...] = ()  # layers with a dense MLP whatever the step says

    def moe_layers(self) -> tuple[bool, ...]:
        return tuple((i + 1) % self.decoder_sparse_step == 0 and i not in self.mlp_only_layers
                     for i in range(self.num_layers))

    def validate(self) -> None:
        super().validate()
        if self.decoder_sparse_step <= 0:
            raise UserError(f"model.decoder_sparse_step={self.decoder_sparse_step} must be "
                            "positive (1: every layer is a mixture of experts)")
        outside = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
        if outside:
            raise UserError(f"model.mlp_only_layers={list(self.mlp_only_layers)} names layer "
                            f"{outside[0]}, not one of the model.num_layers={self.num_layers} "
                            f"layers (0 to {self.num_layers - 1})")
        if not any(self.moe_layers()):
            raise UserError(f"model.decoder_sparse_step={self.decoder_sparse_step} and "
                            f"model.mlp_only_layers={list(self.mlp_only_layers)} leave no layer "
                            "a mixture of experts; use model.family=qwen3 for a dense model")
