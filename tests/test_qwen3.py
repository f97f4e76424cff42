"""The Qwen3 family against transformers' Qwen3: logits of an imported random model on every
kind of mesh, greedy generation token for token, an export transformers loads, both spellings
of config.json, and training on a mesh equal to one device."""

import json

import numpy as np
import pytest

from conftest import tiny_config
from hf_models import TOKENS, WORDS, hf_logits, hf_qwen3, our_logits
from pjit_llm.checkpoint.run_dir import run_config
from pjit_llm.errors import UserError
from pjit_llm.interop import hf as convert
from pjit_llm.models.families import hf_family
from pjit_llm.models.qwen3 import hf as qwen3_hf
from test_step import run_steps


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(transformers' model, our run directory imported from it)."""
    tmp = tmp_path_factory.mktemp("qwen3")
    model = hf_qwen3(tmp / "hf")
    return model, convert.import_hf(tmp / "hf", tmp / "run")


def test_config_json_picks_the_family_and_its_shape(imported):
    cfg = run_config(imported[1]).model
    assert type(cfg).__name__ == "Qwen3Config" and cfg.family == "qwen3"
    assert (cfg.head_size, cfg.embed_dim // cfg.num_heads) == (32, 16)
    assert (cfg.vocab_size, cfg.real_vocab_size, cfg.rope_theta) == (384, 303, 1e6)


@pytest.mark.parametrize("mesh", [None, {"fsdp": 2, "tensor": 2}, {"stage": 2}, {"context": 2},
                                  {"data": 2, "tensor": 4}],
                         ids=["one device", "fsdp x tensor", "stage", "context",
                              "kv heads repeated"])
def test_imported_qwen3_gives_the_logits_of_transformers(imported, mesh):
    model, run = imported
    expected, got = hf_logits(model, TOKENS), our_logits(run, TOKENS, mesh)
    print(f"max |logit difference| {np.abs(got - expected).max():.2e} of {np.abs(expected).max():.2f}")
    assert np.abs(expected).max() > 1.0
    assert np.abs(got - expected).max() < 1e-4


def test_qwen3_generates_what_transformers_generates(imported):
    import torch
    from tokenizers import Tokenizer

    from pjit_llm.inference.generator import Sampling, generate_texts
    model, run = imported
    tok = Tokenizer.from_file(str(run / "tokenizer.json"))
    prompt = "the cat sat on"
    ids = tok.encode(prompt, add_special_tokens=False).ids
    model.generation_config.eos_token_id = None
    out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    expected = tok.decode(out[0, len(ids):].tolist())
    assert generate_texts(run, [prompt], 12, Sampling()) == [expected]
    assert len(expected.split()) == 12 and set(expected.split()) <= set(WORDS)


def test_an_export_loads_in_transformers_with_the_same_logits(imported, tmp_path):
    import transformers
    _, run = imported
    out, _ = convert.export_hf(run, tmp_path / "out", None, None, shard_bytes=10**9)
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == "qwen3" and written["head_dim"] == 32
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.vocab_size == 303
    difference = np.abs(hf_logits(model.eval(), TOKENS) - our_logits(run, TOKENS)).max()
    assert difference < 1e-4


def test_both_spellings_of_config_json_read_alike(imported):
    model, _ = imported
    v5 = model.config.to_dict()  # transformers 5: rope_parameters
    ours, _ = qwen3_hf.model_config(v5, "v5")
    v4 = {k: v for k, v in v5.items() if k not in ("rope_parameters", "layer_types")}
    v4.update(rope_theta=1e6, rope_scaling=None, torch_dtype="float32")
    assert qwen3_hf.model_config(v4, "v4")[0] == ours
    exported = qwen3_hf.hf_config(ours, "float32")
    assert qwen3_hf.model_config(exported, "ours")[0] == ours
    with pytest.raises(UserError, match="sliding-window attention"):
        qwen3_hf.model_config({**v5, "use_sliding_window": True}, "x")


def test_an_unsupported_model_type_is_refused_naming_those_read():
    with pytest.raises(UserError) as e:
        hf_family({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "config.json")
    assert str(e.value) == ("config.json: model_type gpt2 is not supported; the model types "
                            "read are: llama, mistral, qwen3")
    assert hf_family({"model_type": "qwen3"}, "x").name == "qwen3"
    assert hf_family({"architectures": ["MistralForCausalLM"]}, "x").name == "llama"


def test_qwen3_trains_on_a_mesh_as_on_one_device():
    cfg = tiny_config("model.family=qwen3", "model.head_dim=48")
    ref_losses, ref_params = run_steps(cfg, None)
    assert ref_losses[-1] < ref_losses[0]
    assert ref_params["blocks"]["attn"]["q_norm"]["scale"].shape == (2, 48)
    losses, params = run_steps(cfg, {"fsdp": 2, "tensor": 2})
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    for a, b in zip(jax_leaves(params), jax_leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def jax_leaves(tree):
    import jax
    return jax.tree.leaves(tree)
