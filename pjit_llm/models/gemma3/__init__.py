"""The Gemma 3 family (text decoder): config.py (local and global layers, Gemma's traits),
the block with norms around attention and the MLP in model.py, the Hugging Face mapping in
hf.py and the FLOP count with sliding windows in flops.py."""

from pjit_llm.models.family import Family
from pjit_llm.models.gemma3 import flops, hf
from pjit_llm.models.gemma3.config import Gemma3Config
from pjit_llm.models.gemma3.model import Gemma3Transformer
from pjit_llm.models.llama.model import QUANTIZED_WEIGHTS

FAMILY = Family(name="gemma3", config=Gemma3Config, model=Gemma3Transformer,
                quantized_weights=QUANTIZED_WEIGHTS,
                train_flops_per_token=flops.train_flops_per_token,
                hf_architectures=hf.ARCHITECTURES, hf_model_config=hf.model_config,
                hf_config=hf.hf_config, hf_layer_weights=hf.LAYER_WEIGHTS,
                hf_top_weights=hf.TOP_WEIGHTS)
