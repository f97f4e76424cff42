"""The Qwen3 family in Hugging Face's format: Llama's tensors plus each layer's query and key
norms, config.json with `head_dim` and the sliding-window keys (which no released dense
Qwen3 uses: a checkpoint that does is refused)."""

from pjit_llm.errors import UserError
from pjit_llm.models.hf_format import decoder_fields, decoder_json, number, with_param_dtype
from pjit_llm.models.llama import hf as llama_hf
from pjit_llm.models.qwen3.config import Qwen3Config

ARCHITECTURES = {"Qwen3ForCausalLM": "qwen3"}


def model_config(hf: dict, source: str, param_dtype: str | None = None) -> tuple[Qwen3Config, str]:
    def refuse(what: str) -> UserError:
        return UserError(f"{source}: {what} is not supported (only dense Qwen3 decoders that "
                         "this model computes exactly can be imported)")

    cfg = Qwen3Config(**decoder_and_head_fields(hf, source, refuse))
    return with_param_dtype(cfg, hf, param_dtype)


def decoder_and_head_fields(hf: dict, source: str, refuse) -> dict:
    """The shared decoder fields and the head size of a Qwen3 config.json (dense or MoE),
    refusing what the model does not compute: an activation other than SiLU, sliding windows."""
    if hf.get("hidden_act", "silu") != "silu":
        raise refuse(f"activation hidden_act={hf['hidden_act']}")
    sliding = [t for t in hf.get("layer_types") or [] if t != "full_attention"]
    if hf.get("use_sliding_window") or sliding:
        raise refuse("sliding-window attention (use_sliding_window / layer_types)")
    fields = decoder_fields(hf, source, refuse, theta_default=1000000.0)
    return {**fields, "head_dim": number(hf, "head_dim", int, source,
                                         fields["embed_dim"] // fields["num_heads"])}


def hf_config(cfg: Qwen3Config, dtype: str, eos_id: int | None = None) -> dict:
    """The config.json of Qwen3ForCausalLM computing the same function as `cfg`."""
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
            **full_attention_json(cfg), **decoder_json(cfg, dtype, eos_id)}


def full_attention_json(cfg) -> dict:
    """config.json's keys saying every layer attends globally with SiLU MLPs (Qwen3, dense
    or MoE)."""
    return {"hidden_act": "silu", "use_sliding_window": False, "sliding_window": None,
            "max_window_layers": cfg.num_layers,
            "layer_types": ["full_attention"] * cfg.num_layers}


LAYER_WEIGHTS = [
    *llama_hf.LAYER_WEIGHTS[:5],
    (("blocks", "attn", "q_norm", "scale"), "model.layers.{i}.self_attn.q_norm.weight", 0),
    (("blocks", "attn", "k_norm", "scale"), "model.layers.{i}.self_attn.k_norm.weight", 0),
    *llama_hf.LAYER_WEIGHTS[5:],
]
TOP_WEIGHTS = llama_hf.TOP_WEIGHTS
