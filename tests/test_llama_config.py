"""The Llama family's config section: shapes that cannot work are refused with the fix."""

import dataclasses

import pytest

from pjit_llm.errors import UserError
from pjit_llm.models.llama.config import LlamaConfig as ModelConfig


def test_the_defaults_are_valid_and_head_dim_follows():
    cfg = ModelConfig()
    cfg.validate()
    assert cfg.head_size == 256 // 8


@pytest.mark.parametrize("change, message", [
    ({"embed_dim": 40, "num_heads": 8}, "head dimension embed_dim/num_heads=5 must be even"),
    ({"rope_scaling": "llama3", "rope_high_freq_factor": 1.0},
     "must exceed model.rope_low_freq_factor"),
    ({"attention": "cudnn"}, "model.attention=cudnn needs model.dtype=bfloat16"),
    ({"vocab_size": -1}, "model.vocab_size must be >= 0 (0: follow the tokenizer)"),
    ({"loss_chunk": -2}, "model.loss_chunk must be >= 0 (0: no chunks)"),
    ({"norm_eps": 0.0}, "model.norm_eps=0.0 must be positive"),
])
def test_impossible_models_are_refused(change, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        dataclasses.replace(ModelConfig(), **change).validate()
