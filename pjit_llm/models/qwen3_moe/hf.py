"""The Qwen3-MoE family in Hugging Face's format (`Qwen3MoeForCausalLM`, model_type
qwen3_moe): Qwen3's attention tensors and each layer's router (`mlp.gate`) and experts
(`mlp.experts.{j}.gate_proj/up_proj/down_proj`); config.json with the experts' count as
transformers 4 (`num_experts`) and 5 (`num_local_experts`) write it, `moe_intermediate_size`
and `norm_topk_prob`. Only models whose every layer is a mixture of experts are read
(decoder_sparse_step 1, no mlp_only_layers), as every released Qwen3-MoE is."""

from pjit_llm.errors import UserError
from pjit_llm.models.hf_format import decoder_fields, decoder_json, number, with_param_dtype
from pjit_llm.models.mixtral.hf import expert_fields
from pjit_llm.models.qwen3 import hf as qwen3_hf
from pjit_llm.models.qwen3_moe.config import Qwen3MoeConfig

ARCHITECTURES = {"Qwen3MoeForCausalLM": "qwen3_moe"}


def model_config(hf: dict, source: str, param_dtype: str | None = None) -> tuple[Qwen3MoeConfig, str]:
    def refuse(what: str) -> UserError:
        return UserError(f"{source}: {what} is not supported (only Qwen3-MoE decoders whose "
                         "every layer is a mixture of experts can be imported)")

    if hf.get("hidden_act", "silu") != "silu":
        raise refuse(f"activation hidden_act={hf['hidden_act']}")
    sliding = [t for t in hf.get("layer_types") or [] if t != "full_attention"]
    if hf.get("use_sliding_window") or sliding:
        raise refuse("sliding-window attention (use_sliding_window / layer_types)")
    if number(hf, "decoder_sparse_step", int, source, 1) != 1:
        raise refuse(f"dense layers between the sparse ones "
                     f"(decoder_sparse_step={hf['decoder_sparse_step']})")
    if hf.get("mlp_only_layers"):
        raise refuse(f"dense layers (mlp_only_layers={hf['mlp_only_layers']})")
    fields = decoder_fields(hf, source, refuse, theta_default=1000000.0)
    cfg = Qwen3MoeConfig(
        **fields, head_dim=number(hf, "head_dim", int, source,
                                  fields["embed_dim"] // fields["num_heads"]),
        expert_mlp_dim=number(hf, "moe_intermediate_size", int, source),
        norm_topk_prob=number(hf, "norm_topk_prob", bool, source, False),
        **expert_fields(hf, source, 128))
    return with_param_dtype(cfg, hf, param_dtype)


def hf_config(cfg: Qwen3MoeConfig, dtype: str, eos_id: int | None = None) -> dict:
    """The config.json of Qwen3MoeForCausalLM computing the same function as `cfg`."""
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "hidden_act": "silu", "use_sliding_window": False, "sliding_window": None,
            "max_window_layers": cfg.num_layers,
            "layer_types": ["full_attention"] * cfg.num_layers,
            "num_experts": cfg.num_experts, "num_local_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.experts_per_token,
            "moe_intermediate_size": cfg.expert_size, "norm_topk_prob": cfg.norm_topk_prob,
            "decoder_sparse_step": 1, "mlp_only_layers": [],
            "router_aux_loss_coef": cfg.router_aux_loss_coef, "output_router_logits": False,
            **decoder_json(cfg, dtype, eos_id)}


EXPERT_WEIGHTS = [
    (("blocks", "mlp", "router"), "model.layers.{i}.mlp.gate.weight", 1),
    (("blocks", "mlp", "expert_gate"), "model.layers.{i}.mlp.experts.{j}.gate_proj.weight", 1),
    (("blocks", "mlp", "expert_up"), "model.layers.{i}.mlp.experts.{j}.up_proj.weight", 1),
    (("blocks", "mlp", "expert_down"), "model.layers.{i}.mlp.experts.{j}.down_proj.weight", 1),
]
LAYER_WEIGHTS = [*qwen3_hf.LAYER_WEIGHTS[:8], *EXPERT_WEIGHTS]
TOP_WEIGHTS = qwen3_hf.TOP_WEIGHTS
