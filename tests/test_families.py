"""The Qwen3 and Gemma 3 families against transformers: logits of imported random models on
every kind of mesh, greedy generation token for token (past Gemma's sliding window), exports
transformers loads, both spellings of config.json, and training on meshes equal to one device.
(Llama's own: test_interop_hf.py.)"""

import json

import jax
import numpy as np
import pytest

from conftest import tiny_config
from hf_models import TOKENS, WORDS, greedy_texts, hf_gemma3, hf_logits, hf_qwen3, our_logits
from pjit_llm.checkpoint.run_dir import run_config
from pjit_llm.errors import UserError
from pjit_llm.interop import hf as convert
from pjit_llm.models.families import hf_family
from pjit_llm.models.gemma3 import hf as gemma3_hf
from pjit_llm.models.qwen3 import hf as qwen3_hf
from test_step import run_steps

MAKERS = {"qwen3": hf_qwen3, "gemma3": hf_gemma3}


@pytest.fixture(scope="module", params=list(MAKERS))
def imported(request, tmp_path_factory):
    """(family, transformers' model, our run directory imported from it)."""
    tmp = tmp_path_factory.mktemp(request.param)
    model = MAKERS[request.param](tmp / "hf")
    return request.param, model, convert.import_hf(tmp / "hf", tmp / "run")


def test_config_json_picks_the_family_and_its_shape(imported):
    family, _, run = imported
    cfg = run_config(run).model
    assert cfg.family == family
    assert (cfg.head_size, cfg.embed_dim // cfg.num_heads) == (32, 16)
    assert (cfg.vocab_size, cfg.real_vocab_size, cfg.rope_theta) == (384, 303, 1e6)
    if family == "gemma3":
        assert cfg.local_layers() == (True, True, False) * 2
        assert (cfg.sliding_window, cfg.rope_local_theta, cfg.rope_scaling, cfg.rope_factor,
                cfg.query_pre_attn_scalar) == (8, 1e4, "linear", 2.0, 24.0)


@pytest.mark.parametrize("mesh", [None, {"fsdp": 2, "tensor": 2}, {"stage": 2}, {"context": 2},
                                  {"data": 2, "tensor": 4}],
                         ids=["one device", "fsdp x tensor", "stage", "context",
                              "kv heads repeated"])
def test_imported_models_give_the_logits_of_transformers(imported, mesh):
    _, model, run = imported
    expected, got = hf_logits(model, TOKENS), our_logits(run, TOKENS, mesh)
    print(f"max |logit difference| {np.abs(got - expected).max():.2e} of {np.abs(expected).max():.2f}")
    assert np.abs(expected).max() > 1.0
    assert np.abs(got - expected).max() < 1e-4


def test_they_generate_what_transformers_generates(imported):
    """12 new tokens after a 4-word prompt: past Gemma's window of 8."""
    _, model, run = imported
    expected, ours = greedy_texts(model, run, 12)
    assert ours == expected
    assert len(expected.split()) == 12 and set(expected.split()) <= set(WORDS)


def test_an_export_loads_in_transformers_with_the_same_logits(imported, tmp_path):
    import transformers
    family, _, run = imported
    out, _ = convert.export_hf(run, tmp_path / "out", None, None, shard_bytes=10**9)
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == {"qwen3": "qwen3", "gemma3": "gemma3_text"}[family]
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == {"qwen3": "Qwen3", "gemma3": "Gemma3"}[family] + "ForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.vocab_size == 303
    difference = np.abs(hf_logits(model.eval(), TOKENS) - our_logits(run, TOKENS)).max()
    assert difference < 1e-4


def test_both_spellings_of_config_json_read_alike(imported):
    family, model, _ = imported
    mapping = {"qwen3": qwen3_hf, "gemma3": gemma3_hf}[family]
    v5 = model.config.to_dict()  # transformers 5: rope_parameters (per layer type for Gemma)
    ours, _ = mapping.model_config(v5, "v5")
    v4 = {k: v for k, v in v5.items() if k not in ("rope_parameters", "layer_types")}
    v4.update(rope_theta=1e6, torch_dtype="float32")
    if family == "gemma3":
        v4.update(rope_scaling={"type": "linear", "factor": 2.0}, rope_local_base_freq=1e4,
                  sliding_window_pattern=3)
    assert mapping.model_config(v4, "v4")[0] == ours
    assert mapping.model_config(mapping.hf_config(ours, "float32"), "ours")[0] == ours


@pytest.mark.parametrize("change, message", [
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0 is not supported"),
    ({"hidden_activation": "gelu"}, "activation hidden_activation=gelu is not supported"),
    ({"layer_types": ["full_attention", "sliding_attention"] * 3}, "layer_types other than"),
    ({"use_bidirectional_attention": True}, "bidirectional attention is not supported"),
])
def test_gemma3_configs_it_does_not_compute_are_refused(change, message):
    config = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
              "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 32, **change}
    with pytest.raises(UserError, match=message):
        gemma3_hf.model_config(config, "config.json")


def test_an_unsupported_model_type_is_refused_naming_those_read():
    with pytest.raises(UserError) as e:
        hf_family({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "config.json")
    assert str(e.value) == ("config.json: model_type gpt2 is not supported; the model types "
                            "read are: gemma3_text, llama, mistral, mixtral, qwen3, qwen3_moe")
    assert hf_family({"model_type": "qwen3"}, "x").name == "qwen3"
    assert hf_family({"architectures": ["MistralForCausalLM"]}, "x").name == "llama"
    with pytest.raises(UserError, match="sliding-window attention"):
        qwen3_hf.model_config({"use_sliding_window": True, "hidden_size": 64,
                               "num_attention_heads": 4}, "x")


@pytest.mark.parametrize("family, overrides, meshes", [
    ("qwen3", ("model.head_dim=48",), [{"fsdp": 2, "tensor": 2}]),
    # 4 layers, local-local-global-local, windows of 8 in rows of 32 (rows reordered for
    # context load balance: the window follows each token's place, not the array order)
    ("gemma3", ("model.num_layers=4", "model.sliding_window=8", "model.global_every=3"),
     [{"context": 2, "tensor": 2}]),
])
def test_families_train_on_meshes_as_on_one_device(family, overrides, meshes):
    cfg = tiny_config(f"model.family={family}", *overrides)
    ref_losses, ref_params = run_steps(cfg, None)
    assert ref_losses[-1] < ref_losses[0]
    for mesh in meshes:
        losses, params = run_steps(cfg, mesh)
        np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
