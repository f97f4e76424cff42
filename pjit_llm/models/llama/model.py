"""The Llama family's block (pre-norm attention and SwiGLU MLP, each added to the residual
stream) and which of its weights int8 quantization scales per channel. Llama 2/3 and
Mistral without sliding windows compute this; so does Qwen3, whose attention normalises each
query and key head first (a trait of its config)."""

from flax import nnx

from pjit_llm.models.decoder import Transformer
from pjit_llm.models.decoder_config import DecoderConfig
from pjit_llm.models.layers import MLP, Attention, Axes, RMSNorm
from pjit_llm.parallel.layout import Layout, constrain

# The logical axes each weight's multiplies contract (the einsums below): int8 quantization
# (models/quantize.py) keeps one scale per remaining, output, channel. The embedding table is
# scaled per row (per token), which serves its lookup and the tied vocabulary projection alike.
QUANTIZED_WEIGHTS: dict[str, Axes] = {
    "wq": ("embed",), "wk": ("embed",), "wv": ("embed",), "wo": ("heads", "head_dim"),
    "w_gate": ("embed",), "w_up": ("embed",), "w_down": ("mlp",),
    "embed": ("embed",), "unembed": ("embed",)}


class Block(nnx.Module):
    mlp_class: type[nnx.Module] = MLP  # a mixture of experts' block swaps in its MLP

    def __init__(self, cfg: DecoderConfig, layout: Layout | None, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, cfg.param_dtype)
        self.attn = Attention(cfg, layout, rngs)
        self.mlp_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, cfg.param_dtype)
        self.mlp = self.mlp_class(cfg, layout, rngs)
        self.layout = layout

    def __call__(self, x_BLD, sin, cos, mask_B1LS, kv=None, causal=True):
        attn_BLD, kv = self.attn(self.attn_norm(x_BLD), sin, cos, mask_B1LS, kv, causal)
        x_BLD = x_BLD + attn_BLD
        x_BLD = x_BLD + self.mlp(self.mlp_norm(x_BLD))
        return constrain(self.layout, x_BLD, ("batch", "length", "embed")), kv


class LlamaTransformer(Transformer):
    block_class = Block
