"""The Qwen3-MoE family: its config (Qwen3's attention, the experts' keys, which layers are
dense) in config.py and its Hugging Face mapping in hf.py; the model (its sparse and dense
stacks), the FLOP count of the active parameters and the quantized weights are Mixtral's,
since the query/key norms are a trait of the shared attention."""

from pjit_llm.models.family import Family
from pjit_llm.models.mixtral import flops
from pjit_llm.models.mixtral.model import QUANTIZED_WEIGHTS, MoETransformer
from pjit_llm.models.qwen3_moe import hf
from pjit_llm.models.qwen3_moe.config import Qwen3MoeConfig

FAMILY = Family(name="qwen3_moe", config=Qwen3MoeConfig, model=MoETransformer,
                quantized_weights=QUANTIZED_WEIGHTS,
                train_flops_per_token=flops.train_flops_per_token,
                hf_architectures=hf.ARCHITECTURES, hf_model_config=hf.model_config,
                hf_config=hf.hf_config, hf_layer_weights=hf.LAYER_WEIGHTS,
                hf_top_weights=hf.TOP_WEIGHTS)
