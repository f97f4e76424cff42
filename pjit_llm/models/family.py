"""What the rest of the code knows of a model family: one `Family` record, which the family's
package builds and models/families.py lists."""

from collections.abc import Callable
from dataclasses import dataclass

from pjit_llm.models.decoder import Transformer
from pjit_llm.models.decoder_config import DecoderConfig
from pjit_llm.models.hf_format import WeightTable
from pjit_llm.models.layers import Axes


@dataclass(frozen=True)
class Family:
    name: str  # model.family
    config: type[DecoderConfig]  # the `model` section
    model: type[Transformer]  # the shared decoder with the family's block
    # The logical axes each weight's multiplies contract: int8 quantization keeps one scale
    # per remaining (output) channel (models/quantize.py).
    quantized_weights: dict[str, Axes]
    train_flops_per_token: Callable[[DecoderConfig, int], float]  # (config, sequence length)
    # Hugging Face: the architectures read (-> model_type), config.json -> (config, declared
    # dtype) given (dict, source, dtype or None), config -> config.json given (config, dtype,
    # eos id or None), and the tensor tables (models/hf_format.py).
    hf_architectures: dict[str, str]
    hf_model_config: Callable
    hf_config: Callable
    hf_layer_weights: WeightTable
    hf_top_weights: WeightTable
