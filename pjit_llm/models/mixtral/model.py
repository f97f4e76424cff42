"""The mixture-of-experts decoder: Llama's block with the shared MoE MLP (models/moe.py) in
place of the dense one. Mixtral computes this, every layer a mixture of experts; so does
Qwen3-MoE, whose attention normalises each query and key head first (a trait of its config)
and whose config may make some layers dense (`moe_layers`): those are Llama's block, with an
MLP model.mlp_dim wide, stacked apart (`dense_blocks`) so that no layer holds both."""

from flax import nnx

from pjit_llm.errors import UserError
from pjit_llm.models.decoder import Transformer
from pjit_llm.models.layers import Axes
from pjit_llm.models.llama.model import QUANTIZED_WEIGHTS as LLAMA_QUANTIZED
from pjit_llm.models.llama.model import Block
from pjit_llm.models.moe import MoEMLP
from pjit_llm.models.moe_config import MoEConfig
from pjit_llm.parallel.layout import Layout
from pjit_llm.parallel.stages import Pipeline

# int8 quantization scales attention, the embeddings and the dense layers' MLPs as Llama's,
# and each expert's weights per expert and output channel (models/moe.py applies the scales
# after the grouped products); the router stays in the parameter dtype, its logits in float32.
QUANTIZED_WEIGHTS: dict[str, Axes] = {
    **LLAMA_QUANTIZED,
    "expert_gate": ("embed",), "expert_up": ("embed",), "expert_down": ("mlp",)}


class MoEBlock(Block):
    mlp_class = MoEMLP


class MoETransformer(Transformer):
    block_class = MoEBlock
    dense_block_class = Block

    @classmethod
    def dense_layers(cls, cfg: MoEConfig) -> tuple[bool, ...]:
        return tuple(not moe for moe in cfg.moe_layers())

    def __init__(self, cfg, layout: Layout | None, rngs: nnx.Rngs,
                 pipeline: Pipeline | None = None, layer_list: bool = False):
        if pipeline is not None and any(self.dense_layers(cfg)):
            raise UserError(f"model.family={cfg.family}: pipeline stages (mesh.stage > 1) do "
                            "not run a stack that mixes dense and mixture-of-experts layers "
                            "(model.decoder_sparse_step, model.mlp_only_layers); use "
                            "mesh.stage=1")
        super().__init__(cfg, layout, rngs, pipeline, layer_list)
