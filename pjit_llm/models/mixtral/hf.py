"""The Mixtral family in Hugging Face's format (`MixtralForCausalLM`, model_type mixtral):
config.json with `num_local_experts`, `num_experts_per_tok`, `router_aux_loss_coef`, rotary
settings as transformers 4 (`rope_theta`) and 5 (`rope_parameters`) write them, and the
tensors: Llama's attention, each layer's router (`block_sparse_moe.gate`) and its experts'
w1 (gate), w3 (up) and w2 (down), one tensor per expert. Sliding windows and router jitter
are refused."""

from pjit_llm.errors import UserError
from pjit_llm.models.hf_format import decoder_fields, decoder_json, number, with_param_dtype
from pjit_llm.models.llama import hf as llama_hf
from pjit_llm.models.mixtral.config import MixtralConfig

ARCHITECTURES = {"MixtralForCausalLM": "mixtral"}


def model_config(hf: dict, source: str, param_dtype: str | None = None) -> tuple[MixtralConfig, str]:
    def refuse(what: str) -> UserError:
        return UserError(f"{source}: {what} is not supported (only Mixtral decoders that this "
                         "model computes exactly can be imported)")

    if hf.get("hidden_act", "silu") != "silu":
        raise refuse(f"activation hidden_act={hf['hidden_act']}")
    if hf.get("sliding_window") is not None:
        raise refuse(f"sliding-window attention (sliding_window={hf['sliding_window']})")
    if hf.get("router_jitter_noise"):
        raise refuse(f"router_jitter_noise={hf['router_jitter_noise']}")
    fields = decoder_fields(hf, source, refuse, theta_default=1000000.0)
    cfg = MixtralConfig(
        **fields, head_dim=number(hf, "head_dim", int, source,
                                  fields["embed_dim"] // fields["num_heads"]),
        **expert_fields(hf, source, 8))
    return with_param_dtype(cfg, hf, param_dtype)


def expert_fields(hf: dict, source: str, experts_default: int) -> dict:
    """The mixture-of-experts keys config.json gives: the experts' count under either name
    (transformers 5 writes num_local_experts for every MoE family, 4 num_experts for
    Qwen3-MoE), the top-k and the load-balancing coefficient."""
    key = "num_local_experts" if hf.get("num_local_experts") is not None else "num_experts"
    return dict(
        num_experts=number(hf, key, int, source, experts_default),
        experts_per_token=number(hf, "num_experts_per_tok", int, source, 2),
        router_aux_loss_coef=number(hf, "router_aux_loss_coef", float, source, 0.001))


def hf_config(cfg: MixtralConfig, dtype: str, eos_id: int | None = None) -> dict:
    """The config.json of MixtralForCausalLM computing the same function as `cfg`."""
    if not cfg.norm_topk_prob or cfg.expert_mlp_dim not in (0, cfg.mlp_dim):
        raise UserError("a Mixtral export needs model.norm_topk_prob=true and "
                        "model.expert_mlp_dim=0 (experts as wide as model.mlp_dim): Mixtral's "
                        "config.json has no other setting")
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "hidden_act": "silu", "sliding_window": None, "router_jitter_noise": 0.0,
            "num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.experts_per_token,
            "router_aux_loss_coef": cfg.router_aux_loss_coef, "output_router_logits": False,
            **decoder_json(cfg, dtype, eos_id)}


EXPERT_WEIGHTS = [
    (("blocks", "mlp", "router"), "model.layers.{i}.block_sparse_moe.gate.weight", 1),
    (("blocks", "mlp", "expert_gate"), "model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight", 1),
    (("blocks", "mlp", "expert_down"), "model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight", 1),
    (("blocks", "mlp", "expert_up"), "model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight", 1),
]
LAYER_WEIGHTS = [*llama_hf.LAYER_WEIGHTS[:6], *EXPERT_WEIGHTS]
TOP_WEIGHTS = llama_hf.TOP_WEIGHTS
