"""The Llama family's Hugging Face mapping: config.json to our model config and back, the
dtype an import takes, and unsupported models refused by name."""

import pytest

from hf_models import LLAMA, LLAMA3_ROPE
from pjit_llm.errors import UserError
from pjit_llm.models import hf_format
from pjit_llm.models.llama import hf as hf_config


@pytest.mark.parametrize("stored, chosen, dtype, note", [
    (["bfloat16"], None, "bfloat16", None),
    (["float32"], None, "float32", None),
    (["float16"], "bfloat16", "bfloat16",
     "the checkpoint is float16; its weights are converted to bfloat16 (rounded)"),
    (["bfloat16"], "float32", "float32",
     "the checkpoint is bfloat16; its weights are converted to float32 (exact)"),
    (["bfloat16", "float32"], None, "float32",
     "the checkpoint is bfloat16 and float32; its weights are converted to float32 (exact); "
     "pass --dtype bfloat16 to halve the memory"),
])
def test_import_dtype_and_what_is_said_of_it(stored, chosen, dtype, note):
    assert hf_format.import_dtype(stored, chosen) == (dtype, note)


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "architecture GPT2LMHeadModel is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn' is not supported"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4}}, "rope scaling 'dynamic'"),
    ({"attention_bias": True}, "attention_bias=true (biases) is not supported"),
    ({"hidden_act": "gelu"}, "activation hidden_act=gelu is not supported"),
    ({"head_dim": 16}, "head_dim=16 different from hidden_size/num_attention_heads=8"),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": 4096}, "sliding-window attention"),
    ({"hidden_size": "wide"}, "field hidden_size='wide' is missing or not a valid int"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "field low_freq_factor=None"),
])
def test_unsupported_models_are_refused_by_name(change, message):
    with pytest.raises(UserError) as e:
        hf_config.model_config({**LLAMA, **change}, "config.json")
    assert str(e.value).startswith("config.json") and message in str(e.value)


def test_config_mapping_round_trips_both_rope_spellings():
    v4 = {**LLAMA, "rope_theta": 5e5, "rope_scaling": {"type": "llama3", **{
        k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}}, "torch_dtype": "bfloat16"}
    cfg, dtype = hf_config.model_config(v4, "x")
    assert (cfg.rope_scaling, cfg.rope_theta, cfg.rope_original_max_len, dtype, cfg.param_dtype) \
        == ("llama3", 5e5, 16, "bfloat16", "bfloat16")
    v5 = hf_config.hf_config(cfg, "bfloat16")
    assert hf_config.model_config({**v5, "rope_theta": None, "rope_scaling": None}, "x")[0] == cfg
    mistral = {**LLAMA, "architectures": ["MistralForCausalLM"], "sliding_window": None}
    assert hf_config.model_config(mistral, "x")[0].num_kv_heads == 4

