"""A mixture of experts' FLOPs per trained token count the ACTIVE parameters: Llama's count
(models/llama/flops.py) with each mixture-of-experts layer's dense MLP replaced by the router
(D x E) and the k experts a token goes to (3 x D x F each), not all E of them; a dense layer
(Qwen3-MoE's decoder_sparse_step, mlp_only_layers) keeps its MLP."""

from pjit_llm.models.llama.flops import matmul_params as dense_matmul_params
from pjit_llm.models.moe_config import MoEConfig


def matmul_params(cfg: MoEConfig) -> int:
    D = cfg.embed_dim
    dense_mlp = 3 * D * cfg.mlp_dim
    active_mlp = D * cfg.num_experts + cfg.experts_per_token * 3 * D * cfg.expert_size
    return dense_matmul_params(cfg) + sum(cfg.moe_layers()) * (active_mlp - dense_mlp)


def train_flops_per_token(cfg: MoEConfig, seq_len: int) -> float:
    return 6 * matmul_params(cfg) + 6 * cfg.num_layers * cfg.num_heads * cfg.head_size * seq_len
