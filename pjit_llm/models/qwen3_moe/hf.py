"""The Qwen3-MoE family in Hugging Face's format (`Qwen3MoeForCausalLM`, model_type
qwen3_moe): Qwen3's attention tensors and each layer's router (`mlp.gate`) and experts
(`mlp.experts.{j}.gate_proj/up_proj/down_proj`); config.json with the experts' count as
transformers 4 (`num_experts`) and 5 (`num_local_experts`) write it, `moe_intermediate_size`,
`norm_topk_prob`, and which layers are dense (`decoder_sparse_step`, `mlp_only_layers`): a
dense layer's MLP is `mlp.gate_proj/up_proj/down_proj`, as Qwen3's, in our `dense_blocks`."""

from pjit_llm.errors import UserError
from pjit_llm.models.decoder import DENSE_STACK
from pjit_llm.models.hf_format import decoder_json, number, with_param_dtype
from pjit_llm.models.mixtral.hf import expert_fields
from pjit_llm.models.qwen3 import hf as qwen3_hf
from pjit_llm.models.qwen3_moe.config import Qwen3MoeConfig

ARCHITECTURES = {"Qwen3MoeForCausalLM": "qwen3_moe"}


def model_config(hf: dict, source: str, param_dtype: str | None = None) -> tuple[Qwen3MoeConfig, str]:
    def refuse(what: str) -> UserError:
        return UserError(f"{source}: {what} is not supported (only Qwen3-MoE decoders that "
                         "this model computes exactly can be imported)")

    fields = qwen3_hf.decoder_and_head_fields(hf, source, refuse)
    dense = hf.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(isinstance(i, int) for i in dense):
        raise UserError(f"{source}: field mlp_only_layers={dense!r} is not a list of layer "
                        "indices; is it the model's config.json?")
    cfg = Qwen3MoeConfig(
        **fields, expert_mlp_dim=number(hf, "moe_intermediate_size", int, source),
        norm_topk_prob=number(hf, "norm_topk_prob", bool, source, False),
        decoder_sparse_step=number(hf, "decoder_sparse_step", int, source, 1),
        mlp_only_layers=tuple(dense), **expert_fields(hf, source, 128))
    return with_param_dtype(cfg, hf, param_dtype)


def hf_config(cfg: Qwen3MoeConfig, dtype: str, eos_id: int | None = None) -> dict:
    """The config.json of Qwen3MoeForCausalLM computing the same function as `cfg`."""
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            **qwen3_hf.full_attention_json(cfg),
            "num_experts": cfg.num_experts, "num_local_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.experts_per_token,
            "moe_intermediate_size": cfg.expert_size, "norm_topk_prob": cfg.norm_topk_prob,
            "decoder_sparse_step": cfg.decoder_sparse_step,
            "mlp_only_layers": list(cfg.mlp_only_layers),
            "router_aux_loss_coef": cfg.router_aux_loss_coef, "output_router_logits": False,
            **decoder_json(cfg, dtype, eos_id)}


EXPERT_WEIGHTS = [
    (("blocks", "mlp", "router"), "model.layers.{i}.mlp.gate.weight", 1),
    (("blocks", "mlp", "expert_gate"), "model.layers.{i}.mlp.experts.{j}.gate_proj.weight", 1),
    (("blocks", "mlp", "expert_up"), "model.layers.{i}.mlp.experts.{j}.up_proj.weight", 1),
    (("blocks", "mlp", "expert_down"), "model.layers.{i}.mlp.experts.{j}.down_proj.weight", 1),
]
# A dense layer's tensors: Qwen3's, in the stack of dense layers.
DENSE_WEIGHTS = [((DENSE_STACK, *path[1:]), name, in_dims)
                 for path, name, in_dims in qwen3_hf.LAYER_WEIGHTS]
LAYER_WEIGHTS = [*qwen3_hf.LAYER_WEIGHTS[:8], *EXPERT_WEIGHTS, *DENSE_WEIGHTS]
TOP_WEIGHTS = qwen3_hf.TOP_WEIGHTS
