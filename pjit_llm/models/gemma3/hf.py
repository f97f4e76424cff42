"""The Gemma 3 text decoder in Hugging Face's format (`Gemma3ForCausalLM`, model_type
gemma3_text): config.json as transformers 4 writes it (`rope_theta` and `rope_scaling` for the
global layers, `rope_local_base_freq`, `sliding_window_pattern`) and as 5 writes it
(`rope_parameters` per layer type, `layer_types`), and the tensors, with the norms before and
after attention and the MLP. Soft-capping and bidirectional attention are refused."""

from pjit_llm.errors import UserError
from pjit_llm.models.gemma3.config import Gemma3Config
from pjit_llm.models.hf_format import (decoder_fields, decoder_json, number, rope_json,
                                       with_param_dtype)
from pjit_llm.models.llama import hf as llama_hf

ARCHITECTURES = {"Gemma3ForCausalLM": "gemma3_text"}
GLOBAL, LOCAL = "full_attention", "sliding_attention"


def model_config(hf: dict, source: str, param_dtype: str | None = None) -> tuple[Gemma3Config, str]:
    def refuse(what: str) -> UserError:
        return UserError(f"{source}: {what} is not supported (only Gemma 3 text decoders that "
                         "this model computes exactly can be imported)")

    activation = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if activation != "gelu_pytorch_tanh":
        raise refuse(f"activation hidden_activation={activation}")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if hf.get(key) is not None:
            raise refuse(f"{key}={hf[key]}")
    if hf.get("use_bidirectional_attention"):
        raise refuse("bidirectional attention")
    rope = hf.get("rope_parameters") or {}
    if GLOBAL in rope:  # transformers 5: one set of rotary settings per layer type
        global_rope, local_rope = rope[GLOBAL], rope.get(LOCAL) or {}
        flat = {**hf, "rope_parameters": global_rope}
        local_theta = number(local_rope, "rope_theta", float, source, 10000.0)
        if local_rope.get("rope_type", "default") != "default":
            raise refuse(f"local rope scaling {local_rope['rope_type']!r}")
    else:
        flat = hf
        local_theta = number(hf, "rope_local_base_freq", float, source, 10000.0)
    fields = decoder_fields(flat, source, refuse, theta_default=1000000.0)
    layers = fields["num_layers"]
    every = _global_every(hf, layers, refuse, source)
    cfg = Gemma3Config(
        **fields, head_dim=number(hf, "head_dim", int, source, 256),
        sliding_window=number(hf, "sliding_window", int, source, 512), global_every=every,
        rope_local_theta=local_theta,
        query_pre_attn_scalar=number(hf, "query_pre_attn_scalar", float, source, 256.0))
    return with_param_dtype(cfg, hf, param_dtype)


def _global_every(hf: dict, layers: int, refuse, source: str) -> int:
    """Every how many layers one is global: from `layer_types` when given (which must be such
    a pattern), else `sliding_window_pattern`."""
    types = hf.get("layer_types")
    if not types:
        return number(hf, "sliding_window_pattern", int, source, 6)
    every = types.index(GLOBAL) + 1 if GLOBAL in types else layers + 1
    if list(types) != [GLOBAL if (i + 1) % every == 0 else LOCAL for i in range(layers)]:
        raise refuse("layer_types other than a local layers, one global, repeated")
    return every


def hf_config(cfg: Gemma3Config, dtype: str, eos_id: int | None = None) -> dict:
    """The config.json of Gemma3ForCausalLM computing the same function as `cfg`."""
    out = decoder_json(cfg, dtype, eos_id)
    local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta}
    return {**out, "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
            "hidden_activation": "gelu_pytorch_tanh",
            # transformers 5 insists on an int where the value is one (all released models)
            "query_pre_attn_scalar": (int(cfg.query_pre_attn_scalar)
                                      if cfg.query_pre_attn_scalar.is_integer()
                                      else cfg.query_pre_attn_scalar),
            "sliding_window": cfg.sliding_window, "sliding_window_pattern": cfg.global_every,
            "layer_types": [LOCAL if local_layer else GLOBAL for local_layer in cfg.local_layers()],
            "rope_local_base_freq": cfg.rope_local_theta,
            "rope_parameters": {GLOBAL: rope_json(cfg)["rope_parameters"], LOCAL: local},
            "final_logit_softcapping": None, "attn_logit_softcapping": None,
            "use_bidirectional_attention": False}


_LLAMA = {name.rsplit(".", 2)[-2]: row for row in llama_hf.LAYER_WEIGHTS
          for name in [row[1]]}  # by the HF module's last name: q_proj, gate_proj, ...
LAYER_WEIGHTS = [
    (("blocks", "attn_norm", "scale"), "model.layers.{i}.input_layernorm.weight", 0),
    _LLAMA["q_proj"], _LLAMA["k_proj"], _LLAMA["v_proj"], _LLAMA["o_proj"],
    (("blocks", "attn", "q_norm", "scale"), "model.layers.{i}.self_attn.q_norm.weight", 0),
    (("blocks", "attn", "k_norm", "scale"), "model.layers.{i}.self_attn.k_norm.weight", 0),
    (("blocks", "post_attn_norm", "scale"), "model.layers.{i}.post_attention_layernorm.weight", 0),
    (("blocks", "mlp_norm", "scale"), "model.layers.{i}.pre_feedforward_layernorm.weight", 0),
    (("blocks", "post_mlp_norm", "scale"), "model.layers.{i}.post_feedforward_layernorm.weight", 0),
    _LLAMA["gate_proj"], _LLAMA["up_proj"], _LLAMA["down_proj"],
]
TOP_WEIGHTS = llama_hf.TOP_WEIGHTS
