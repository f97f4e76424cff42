"""The Llama family in Hugging Face's format: config.json <-> LlamaConfig, and which
safetensors tensor holds which of our parameters (models/hf_format.py does the rest).

Only what our transformer computes exactly is accepted: a Llama decoder (RMSNorm, rotary
positions with no, linear or Llama 3 scaling, grouped-query attention, SwiGLU without
biases). Everything else is refused by name rather than converted into a model that silently
computes something different.
"""

from pjit_llm.errors import UserError
from pjit_llm.models.hf_format import decoder_fields, decoder_json, with_param_dtype
from pjit_llm.models.llama.config import LlamaConfig

# The architectures read, with their model_type; Mistral computes the same function as Llama
# when it has no sliding window.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}


def model_config(hf: dict, source: str, param_dtype: str | None = None) -> tuple[LlamaConfig, str]:
    """(LlamaConfig, the dtype config.json declares) for an HF config dict read from `source`;
    the parameters are in `param_dtype`, by default the declared one when it is one of ours,
    else float32."""
    def refuse(what: str) -> UserError:
        return UserError(f"{source}: {what} is not supported (only Llama-family decoders that "
                         "this model computes exactly can be imported)")

    archs = hf.get("architectures") or ["LlamaForCausalLM"]
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise refuse(f"architecture {', '.join(map(str, archs))}")
    if hf.get("sliding_window") is not None and archs[0] == "MistralForCausalLM":
        raise refuse(f"sliding-window attention (sliding_window={hf['sliding_window']})")
    if hf.get("hidden_act", "silu") != "silu":
        raise refuse(f"activation hidden_act={hf['hidden_act']}")
    cfg = LlamaConfig(**decoder_fields(hf, source, refuse))
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) != cfg.embed_dim // cfg.num_heads:
        raise refuse(f"head_dim={head_dim} different from hidden_size/num_attention_heads="
                     f"{cfg.embed_dim // cfg.num_heads}")
    return with_param_dtype(cfg, hf, param_dtype)


def hf_config(cfg: LlamaConfig, dtype: str, eos_id: int | None = None) -> dict:
    """The config.json of LlamaForCausalLM computing the same function as `cfg`."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "mlp_bias": False, **decoder_json(cfg, dtype, eos_id)}


# HF Linear weights are (out, in): ours (D, H, K) is q_proj (H*K, D) transposed, so 1 leading
# dim; wo (H, K, D) is o_proj (D, H*K) transposed, so 2. 0: the same layout.
LAYER_WEIGHTS = [
    (("blocks", "attn_norm", "scale"), "model.layers.{i}.input_layernorm.weight", 0),
    (("blocks", "attn", "wq"), "model.layers.{i}.self_attn.q_proj.weight", 1),
    (("blocks", "attn", "wk"), "model.layers.{i}.self_attn.k_proj.weight", 1),
    (("blocks", "attn", "wv"), "model.layers.{i}.self_attn.v_proj.weight", 1),
    (("blocks", "attn", "wo"), "model.layers.{i}.self_attn.o_proj.weight", 2),
    (("blocks", "mlp_norm", "scale"), "model.layers.{i}.post_attention_layernorm.weight", 0),
    (("blocks", "mlp", "w_gate"), "model.layers.{i}.mlp.gate_proj.weight", 1),
    (("blocks", "mlp", "w_up"), "model.layers.{i}.mlp.up_proj.weight", 1),
    (("blocks", "mlp", "w_down"), "model.layers.{i}.mlp.down_proj.weight", 1),
]
TOP_WEIGHTS = [
    (("embed",), "model.embed_tokens.weight", 0),
    (("final_norm", "scale"), "model.norm.weight", 0),
    (("unembed",), "lm_head.weight", 1),
]
