"""Hugging Face import and export, checked against transformers itself on real files:
imported models give transformers' logits, exports load in transformers without missing or
unexpected weights, import(export(x)) is bit-identical, and weights that do not match their
config are refused, and so is an int8 export. (Refusals of unsupported configs:
test_llama_hf.py; the command and the memory it takes: e2e/test_convert_cli.py.)"""

import json
import typing
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import build_on
from hf_models import (LLAMA, LLAMA3_ROPE, TOKENS, WORDS, greedy_texts, hf_llama, hf_logits,
                       our_logits, write_hf)
from pjit_llm.checkpoint.exports import write_export
from pjit_llm.checkpoint.run_dir import run_config
from pjit_llm.checkpoint.runs import restore_params
from pjit_llm.errors import UserError
from pjit_llm.interop import hf as convert
from pjit_llm.interop import safetensors_io
from pjit_llm.models import hf_format
from pjit_llm.parallel.layout import is_variable
from pjit_llm.placement import place_for_conversion

# A vocabulary no tensor size divides (515) and fewer key/value heads (2) than tensor shards.
ODD = {"vocab_size": 515, "num_key_value_heads": 2, "tie_word_embeddings": False}


@pytest.mark.parametrize("overrides, mesh", [
    ({}, None),  # multi-head attention, tied embeddings
    ({"num_key_value_heads": 2, "tie_word_embeddings": False, "rope_theta": 500.0,
      "rope_scaling": LLAMA3_ROPE}, {"data": 2, "fsdp": 2, "tensor": 2}),  # grouped-query, untied, Llama 3.1 rope
    ({"num_key_value_heads": 4, "rope_scaling": {"rope_type": "linear", "factor": 4.0}}, {"fsdp": 4, "tensor": 2}),
], ids=["mha-tied", "gqa-untied-llama3-rope", "gqa-linear-rope"])
def test_imported_model_gives_the_logits_of_transformers(tmp_path, overrides, mesh):
    model = hf_llama(tmp_path / "hf", **overrides)
    run = convert.import_hf(tmp_path / "hf", tmp_path / "run")
    expected = hf_logits(model, TOKENS)
    got = our_logits(run, TOKENS, mesh)
    print(f"max |logit difference| {np.abs(got - expected).max():.2e} of logits up to "
          f"{np.abs(expected).max():.2f}")
    assert np.abs(expected).max() > 1.0  # logits large enough for a wrong layout to show
    assert np.abs(got - expected).max() < 5e-5
    cfg = run_config(run)  # 300 tokens, padded to 384
    assert (cfg.model.vocab_size, cfg.model.real_vocab_size, cfg.model.num_kv_heads) == (
        384, 300, overrides.get("num_key_value_heads", 8))
    assert cfg.data.tokenizer == "hf" and Path(cfg.data.tokenizer_path) == run / "tokenizer.json"


def test_float16_checkpoint_imports_exactly_in_float32_and_says_so(tmp_path, capsys):
    model = hf_llama(tmp_path / "hf", dtype="float16", num_key_value_heads=4,
                     tie_word_embeddings=False)
    stored = safetensors_io.SafetensorsDir(tmp_path / "hf")
    assert {stored.files[f].entries[n][0] for f in stored.files for n in stored.files[f].entries} \
        == {np.dtype(np.float16)}
    run = convert.import_hf(tmp_path / "hf", tmp_path / "run")
    assert capsys.readouterr().out.splitlines() == [
        "the checkpoint is float16; its weights are converted to float32 (exact); "
        "pass --dtype bfloat16 to halve the memory"]
    cfg = run_config(run)
    assert cfg.model.param_dtype == "float32"
    layout = build_on(cfg).layout
    params = {hf_format.param_path(k): np.asarray(v[...]) for k, v in jax.tree_util.tree_leaves_with_path(
        restore_params(cfg, layout, None)[0], is_leaf=is_variable)}
    weights = model.state_dict()
    for name, path, in_dims, layer, _ in convert.hf_tensors(cfg.model):
        ours = params[path] if layer is None else params[path][layer]
        real = tuple(slice(0, n) for n in hf_format.unpadded_shape(cfg.model, path, ours.shape))
        # the padding ids' rows hold zeros
        assert ours.dtype == np.float32 and np.count_nonzero(ours) == np.count_nonzero(ours[real])
        ours = ours[real]
        assert np.array_equal(convert.to_hf(ours, in_dims), weights[name].float().numpy()), name
    # transformers' float32 model of the same weights (model.float() would keep the rotary
    # frequencies that the cast to float16 rounded)
    import transformers
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype="float32")
    difference = np.abs(our_logits(run, TOKENS) - hf_logits(reference.eval(), TOKENS)).max()
    print(f"float16 checkpoint in float32: max |logit difference| {difference:.2e}")
    assert difference < 5e-5


def test_converted_model_generates_what_transformers_generates(tmp_path):
    model = hf_llama(tmp_path / "hf", seed=1)
    run = convert.import_hf(tmp_path / "hf", tmp_path / "run")
    expected, ours = greedy_texts(model, run, 8)
    assert [ours] == [expected]
    assert len(expected.split()) == 8 and set(expected.split()) <= set(WORDS)  # words, not ids


def test_fine_tuned_export_loads_in_transformers_and_reimports_bit_identically(
        tmp_path, monkeypatch, capsys):
    from pjit_llm.train import main as train
    transformers = pytest.importorskip("transformers")
    hf_llama(tmp_path / "hf", **ODD)
    base = convert.import_hf(tmp_path / "hf", tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    # The training command, in this process: fine-tune the import for three steps on 4 tensor
    # shards, which its vocabulary (515, padded to 640) and its 2 key/value heads meet padded
    # and repeated.
    train(["--config", str(base / "config.yaml"), f"train.init_from={base}", "mesh.tensor=4",
           "train.run_dir=tuned", "train.steps=3", "optimizer.warmup_steps=1",
           "data.seq_len=32", "data.batch_size=8", "train.eval_every=0",
           "train.sample_tokens=0", "train.eval_batches=1", "data.num_workers=0"])
    said = capsys.readouterr()
    assert f"initialised the parameters from {base} (step 0)" in said.out + said.err
    run = tmp_path / "tuned"
    with pytest.raises(UserError) as wrong:
        train(["--config", str(base / "config.yaml"), f"train.init_from={base}",
               "model.mlp_dim=256", "train.run_dir=wrong"])
    assert str(wrong.value) == (
        f"train.init_from={base} has model.mlp_dim=128 but this run has 256; set "
        f"model.mlp_dim=128 (or start from --config {base / 'config.yaml'})")
    assert not (tmp_path / "wrong").exists()

    out, step = convert.export_hf(run, tmp_path / "out", None, None, shard_bytes=40_000)
    assert step == 3 and (out / safetensors_io.INDEX_FILE).is_file()
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "hf/tokenizer.json").read_bytes()
    model, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert (model.config.vocab_size, model.config.num_key_value_heads) == (515, 2)
    assert model.lm_head.weight.shape == (515, 64) and model.model.embed_tokens.weight.shape == (515, 64)
    ours = our_logits(run, TOKENS)
    difference = np.abs(hf_logits(model.eval(), TOKENS) - ours).max()
    print(f"exported float32: max |logit difference| {difference:.2e}")
    assert difference < 5e-5

    again = convert.import_hf(out, tmp_path / "again")
    cfg = run_config(run)
    layout = build_on(cfg).layout
    first, second = restore_params(cfg, layout, None)[0], restore_params(run_config(again), layout, None)[0]
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    assert run_config(again).model == cfg.model

    half, _ = convert.export_hf(run, tmp_path / "bf16", None, "bfloat16", shard_bytes=2 * 10**9)
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    assert {e[0] for e in safetensors_io.SafetensorsDir(half).files["model.safetensors"].entries.values()} \
        == {np.dtype(jnp.bfloat16)}
    model16 = transformers.LlamaForCausalLM.from_pretrained(half, dtype="float32").eval()
    difference = np.abs(hf_logits(model16, TOKENS) - ours).max()
    print(f"exported bfloat16: max |logit difference| {difference:.2e} of {np.abs(ours).max():.2f}")
    assert difference < 0.05 * np.abs(ours).max()


@pytest.mark.parametrize("drop, reshape, message", [
    (("model.layers.1.mlp.up_proj.weight",), None, "tensor model.layers.1.mlp.up_proj.weight is missing"),
    ((), (63,), "tensor model.norm.weight has shape [63] but config.json implies [64]"),
])
def test_weights_that_do_not_match_the_config_are_refused(tmp_path, drop, reshape, message):
    write_hf(tmp_path / "hf", {**LLAMA, "tie_word_embeddings": True}, drop, reshape)
    with pytest.raises(UserError) as e:
        convert.import_hf(tmp_path / "hf", tmp_path / "run")
    assert message in str(e.value)
    assert not (tmp_path / "run").exists() and [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_export_returns_the_directory_and_the_step_it_declares(tmp_path):
    write_hf(tmp_path / "hf", LLAMA)
    run = convert.import_hf(tmp_path / "hf", tmp_path / "run")
    out, step = convert.export_hf(run, tmp_path / "out", None, None, shard_bytes=10**9)
    assert (out, step) == (tmp_path / "out", 0) and (out / "config.json").is_file()
    assert typing.get_type_hints(convert.export_hf)["return"] == tuple[Path, int]



def test_an_int8_export_is_refused_in_one_line(tmp_path):
    write_hf(tmp_path / "hf", LLAMA)
    run = convert.import_hf(tmp_path / "hf", tmp_path / "run")
    cfg = run_config(run)
    int8, _ = write_export(cfg, place_for_conversion(cfg).layout, None, None, "bfloat16", "int8")
    with pytest.raises(UserError, match="holds int8 parameters, which Hugging Face Llama files "
                                        "do not; export the run it was written from instead"):
        convert.export_hf(int8, tmp_path / "out", None, None, shard_bytes=10**9)
    assert not (tmp_path / "out").exists()



def test_odd_vocabulary_and_few_kv_heads_give_transformers_logits_on_tensor_meshes(tmp_path):
    model = hf_llama(tmp_path / "hf", **ODD)
    run = convert.import_hf(tmp_path / "hf", tmp_path / "run")
    cfg = run_config(run)
    assert (cfg.model.vocab_size, cfg.model.real_vocab_size, cfg.model.num_kv_heads) == (640, 515, 2)
    params = restore_params(cfg, build_on(cfg).layout, None)[0]
    assert params["blocks"]["attn"]["wk"].shape == (2, 64, 2, 8)  # the true heads on disk
    unembed = np.asarray(params["unembed"][...])
    assert unembed.shape == (64, 640) and not unembed[:, 515:].any()  # padding: zeros
    expected = hf_logits(model, TOKENS)
    for mesh in ({"data": 2, "tensor": 4}, {"data": 1, "fsdp": 2, "tensor": 4}):
        got = our_logits(run, TOKENS, mesh, padded=True)
        difference = np.abs(got[..., :515] - expected).max()
        print(f"{mesh}: max |logit difference| {difference:.2e} of {np.abs(expected).max():.2f}")
        assert difference < 5e-5, mesh
        assert (got[..., 515:] == np.finfo(np.float32).min).all()  # never predicted
