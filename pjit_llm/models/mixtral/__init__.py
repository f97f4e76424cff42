"""The Mixtral family (sparse mixture of experts): config.py, the block with the shared MoE
MLP in model.py (models/moe.py computes it), the Hugging Face mapping in hf.py and the FLOP
count of the active parameters in flops.py, gathered in `FAMILY`."""

from pjit_llm.models.family import Family
from pjit_llm.models.mixtral import flops, hf
from pjit_llm.models.mixtral.config import MixtralConfig
from pjit_llm.models.mixtral.model import QUANTIZED_WEIGHTS, MoETransformer

FAMILY = Family(name="mixtral", config=MixtralConfig, model=MoETransformer,
                quantized_weights=QUANTIZED_WEIGHTS,
                train_flops_per_token=flops.train_flops_per_token,
                hf_architectures=hf.ARCHITECTURES, hf_model_config=hf.model_config,
                hf_config=hf.hf_config, hf_layer_weights=hf.LAYER_WEIGHTS,
                hf_top_weights=hf.TOP_WEIGHTS)
