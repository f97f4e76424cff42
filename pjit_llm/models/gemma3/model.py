"""The Gemma 3 block: RMSNorm before and after attention and before and after the MLP, each
branch added to the residual stream after its second norm."""

from flax import nnx

from pjit_llm.models.decoder import Transformer
from pjit_llm.models.decoder_config import DecoderConfig
from pjit_llm.models.layers import MLP, Attention, norm
from pjit_llm.parallel.layout import Layout, constrain


class Block(nnx.Module):
    def __init__(self, cfg: DecoderConfig, layout: Layout | None, rngs: nnx.Rngs):
        D = cfg.embed_dim
        self.attn_norm, self.post_attn_norm = norm(cfg, D), norm(cfg, D)
        self.attn = Attention(cfg, layout, rngs)
        self.mlp_norm, self.post_mlp_norm = norm(cfg, D), norm(cfg, D)
        self.mlp = MLP(cfg, layout, rngs)
        self.layout = layout

    def __call__(self, x_BLD, sin, cos, mask_B1LS, kv=None, causal=True):
        attn_BLD, kv = self.attn(self.attn_norm(x_BLD), sin, cos, mask_B1LS, kv, causal)
        x_BLD = x_BLD + self.post_attn_norm(attn_BLD)
        x_BLD = x_BLD + self.post_mlp_norm(self.mlp(self.mlp_norm(x_BLD)))
        return constrain(self.layout, x_BLD, ("batch", "length", "embed")), kv


class Gemma3Transformer(Transformer):
    block_class = Block
