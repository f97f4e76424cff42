"""How many floating-point operations the model does per trained token.

6 x (parameters used in matrix multiplies) for the forward and backward passes, plus the
attention scores and their weighted sum under the causal mask: 6 x layers x heads x head size
x sequence length, half of the full square (a flash kernel skips the masked half; XLA's
attention computes it, which counts as overhead, not as model FLOPs). This is the usual
model-FLOPs convention for MFU, so figures compare with published ones. Per-head norms and
other elementwise work are left out, as is usual.
"""

from pjit_llm.models.decoder_config import DecoderConfig


def matmul_params(cfg: DecoderConfig) -> int:
    D, H, G, K, F, V = (cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_size,
                        cfg.mlp_dim, cfg.vocab_size)
    per_layer = D * H * K * 2 + D * G * K * 2 + 3 * D * F
    return cfg.num_layers * per_layer + D * V  # the output projection (tied or not)


def train_flops_per_token(cfg: DecoderConfig, seq_len: int) -> float:
    return 6 * matmul_params(cfg) + 6 * cfg.num_layers * cfg.num_heads * cfg.head_size * seq_len
