"""The keys a mixture-of-experts family adds to the `model` section (Mixtral, Qwen3-MoE):
how many experts, how many each token goes to, their width, whether the chosen experts'
probabilities are renormalised, the router losses' coefficients, and how the experts compute
(dropless or within a capacity, which grouped product)."""

from dataclasses import dataclass

from pjit_llm.errors import UserError, require_positive
from pjit_llm.models.decoder_config import DecoderConfig
from pjit_llm.models.expert_products import EXPERT_MATMULS


@dataclass(frozen=True)
class MoEConfig(DecoderConfig):
    num_experts: int = 8
    experts_per_token: int = 2  # top-k
    expert_mlp_dim: int = 0  # each expert's hidden width (0: model.mlp_dim)
    # The k chosen probabilities (a softmax over all experts) divided by their sum (Mixtral
    # always, Qwen3-MoE where config.json says norm_topk_prob), else used as they are.
    norm_topk_prob: bool = True
    # Switch/Mixtral load balancing: num_experts x sum over experts of (fraction of routed
    # assignments) x (mean router probability), pooled over the layers, as transformers
    # computes it; added to the training loss times this coefficient.
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float = 0.0  # ST-MoE: mean squared log-sum-exp of the router logits
    # 0: dropless. > 0: each expert takes at most factor x (a batch shard's tokens x k / E)
    # assignments, the rest dropped (models/expert_dispatch.py); the share is logged.
    expert_capacity_factor: float = 0.0
    # The dropless grouped products (models/expert_products.py): auto, ragged_dot or blocks.
    expert_matmul: str = "auto"

    @property
    def expert_size(self) -> int:
        return self.expert_mlp_dim or self.mlp_dim

    def moe_layers(self) -> tuple[bool, ...]:
        """Which layers are mixtures of experts (every one here); a family that mixes in
        dense layers (MLPs model.mlp_dim wide) says which are not."""
        return (True,) * self.num_layers

    def validate(self) -> None:
        super().validate()
        require_positive(self, "model", "num_experts", "experts_per_token")
        if self.experts_per_token > self.num_experts:
            raise UserError(f"model.experts_per_token={self.experts_per_token} exceeds "
                            f"model.num_experts={self.num_experts}; each token goes to at most "
                            "every expert")
        for name in ("expert_mlp_dim", "router_aux_loss_coef", "router_z_loss_coef",
                     "expert_capacity_factor"):
            if getattr(self, name) < 0:
                raise UserError(f"model.{name} must be >= 0")
        if self.expert_matmul not in EXPERT_MATMULS:
            raise UserError(f"model.expert_matmul={self.expert_matmul!r} is not one of "
                            f"{', '.join(EXPERT_MATMULS)}")
