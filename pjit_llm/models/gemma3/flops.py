"""Gemma 3's FLOPs per trained token: Llama's count of matrix multiplies, and attention that
a local layer's query spends on at most sliding_window keys (on average W - W^2 / 2L of them
over a sequence of L >= W; L / 2 in a global layer, as for any causal attention)."""

from pjit_llm.models.gemma3.config import Gemma3Config
from pjit_llm.models.llama.flops import matmul_params


def train_flops_per_token(cfg: Gemma3Config, seq_len: int) -> float:
    L, W = seq_len, cfg.sliding_window
    local_keys = L / 2 if L <= W else W - W * W / (2 * L)
    keys = sum(local_keys if local else L / 2 for local in cfg.local_layers())
    return 6 * matmul_params(cfg) + 12 * cfg.num_heads * cfg.head_size * keys
