"""The Llama family (Llama 2/3, Mistral without sliding windows): config.py, the block in
model.py, the Hugging Face mapping in hf.py and the FLOP count in flops.py, gathered in
`FAMILY`."""

from pjit_llm.models.family import Family
from pjit_llm.models.llama import flops, hf
from pjit_llm.models.llama.config import LlamaConfig
from pjit_llm.models.llama.model import QUANTIZED_WEIGHTS, LlamaTransformer

FAMILY = Family(name="llama", config=LlamaConfig, model=LlamaTransformer,
                quantized_weights=QUANTIZED_WEIGHTS,
                train_flops_per_token=flops.train_flops_per_token,
                hf_architectures=hf.ARCHITECTURES, hf_model_config=hf.model_config,
                hf_config=hf.hf_config, hf_layer_weights=hf.LAYER_WEIGHTS,
                hf_top_weights=hf.TOP_WEIGHTS)
