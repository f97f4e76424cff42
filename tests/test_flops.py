"""The Llama family's FLOP count: every matrix multiply, and attention."""

from pjit_llm.models.llama import flops as llama_flops
from pjit_llm.models.llama.config import LlamaConfig as ModelConfig


def test_model_flops_count_every_matrix_multiply():
    cfg = ModelConfig(num_layers=2, embed_dim=64, num_heads=8, num_kv_heads=4, mlp_dim=128,
                      vocab_size=384)
    # q, o: 64x64 each; k, v: 64x32 each; MLP: 3 x 64x128; output projection 64x384.
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128
    assert llama_flops.matmul_params(cfg) == 2 * per_layer + 64 * 384
    # Attention: scores and weighted sum, 2 x 2 x width x length forward, x3 with the backward
    # pass, halved by the causal mask.
    assert llama_flops.train_flops_per_token(cfg, 32) == 6 * (2 * per_layer + 64 * 384) + 6 * 2 * 64 * 32

