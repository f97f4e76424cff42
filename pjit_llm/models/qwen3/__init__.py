"""The Qwen3 family (dense): its config (head size, query/key norms) in config.py and its
Hugging Face mapping in hf.py; the block, the FLOP count and the quantized weights are
Llama's, since the query/key norms are a trait of the shared attention."""

from pjit_llm.models.family import Family
from pjit_llm.models.llama import flops
from pjit_llm.models.llama.model import QUANTIZED_WEIGHTS, LlamaTransformer
from pjit_llm.models.qwen3 import hf
from pjit_llm.models.qwen3.config import Qwen3Config

FAMILY = Family(name="qwen3", config=Qwen3Config, model=LlamaTransformer,
                quantized_weights=QUANTIZED_WEIGHTS,
                train_flops_per_token=flops.train_flops_per_token,
                hf_architectures=hf.ARCHITECTURES, hf_model_config=hf.model_config,
                hf_config=hf.hf_config, hf_layer_weights=hf.LAYER_WEIGHTS,
                hf_top_weights=hf.TOP_WEIGHTS)
