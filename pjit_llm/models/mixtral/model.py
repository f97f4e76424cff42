"""The mixture-of-experts decoder: Llama's block with the shared MoE MLP (models/moe.py) in
place of the dense one, in every layer. Mixtral computes this; so does Qwen3-MoE, whose
attention normalises each query and key head first (a trait of its config)."""

from pjit_llm.models.decoder import Transformer
from pjit_llm.models.layers import Axes
from pjit_llm.models.llama.model import QUANTIZED_WEIGHTS as LLAMA_QUANTIZED
from pjit_llm.models.llama.model import Block
from pjit_llm.models.moe import MoEMLP

# int8 quantization scales attention and the embeddings as Llama's, and each expert's weights
# per expert and output channel (models/moe.py applies the scales after the grouped products);
# the router stays in the parameter dtype, its logits in float32.
QUANTIZED_WEIGHTS: dict[str, Axes] = {
    **{name: axes for name, axes in LLAMA_QUANTIZED.items() if not name.startswith("w_")},
    "expert_gate": ("embed",), "expert_up": ("embed",), "expert_down": ("mlp",)}


class MoEBlock(Block):
    mlp_class = MoEMLP


class MoETransformer(Transformer):
    block_class = MoEBlock
