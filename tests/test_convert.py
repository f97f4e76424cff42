"""Hugging Face interop, checked against transformers itself on real files: imported models
give transformers' logits, exports load in transformers without missing or unexpected
weights, import(export(x)) is bit-identical, unsupported models are refused by name, and
conversion memory stays near one parameter rather than the model."""

import copy
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import build_on, run_cli
from pjit_llm.interop import hf as convert
from pjit_llm.interop import safetensors_io
from pjit_llm.models.llama import hf as hf_config
from pjit_llm.config import MeshConfig
from pjit_llm.errors import UserError
from pjit_llm.checkpoint.runs import restore_params, run_config
from pjit_llm.parallel.mesh import make_mesh
from pjit_llm.parallel.layout import Layout
from pjit_llm.models.llama.model import abstract_model

WORDS = ["[UNK]", "the", "cat", "sat", "on", "a", "mat", "dog", "ran", "to", "red", "big",
         "and", "of", "in", "it", "is", "was", "def", "return"]
WORDS += [f"w{i}" for i in range(len(WORDS), 300)]  # every id of the model is a word
TOKENS = np.random.default_rng(0).integers(0, 300, (2, 48)).astype(np.int32)


def hf_llama(directory: Path, seed=0, dtype=None, **overrides):
    """A small random LlamaForCausalLM saved (in `dtype`, default float32) with a word-level
    tokenizer.json beside it."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    settings = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                    initializer_range=0.1, rms_norm_eps=1e-5, tie_word_embeddings=True)
    torch.manual_seed(seed)
    settings = copy.deepcopy({**settings, **overrides})  # transformers edits rope dicts in place
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings)).eval()
    if dtype:
        model = model.to(getattr(torch, dtype))
    model.save_pretrained(directory)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    return model


def hf_logits(model, tokens):
    import torch
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def our_logits(run: Path, tokens, mesh=(1, 1, 1)):
    cfg = run_config(run)
    devices = jax.devices()[: int(np.prod(mesh))]
    layout = Layout(make_mesh(MeshConfig(*mesh), devices), cfg.mesh.rules)
    params, _ = restore_params(cfg, layout, None)
    graphdef, _ = abstract_model(cfg.model, layout)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t, jnp.ones_like(t), positions))
    return np.asarray(forward(params, jnp.asarray(tokens)), np.float32)


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


@pytest.mark.parametrize("overrides, mesh", [
    ({}, (1, 1, 1)),  # multi-head attention, tied embeddings
    ({"num_key_value_heads": 2, "tie_word_embeddings": False, "rope_theta": 500.0,
      "rope_scaling": LLAMA3_ROPE}, (2, 2, 2)),  # grouped-query, untied, Llama 3.1 rope
    ({"num_key_value_heads": 4, "rope_scaling": {"rope_type": "linear", "factor": 4.0}}, (1, 4, 2)),
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
    cfg = run_config(run)
    assert (cfg.model.vocab_size, cfg.model.num_kv_heads) == (300, overrides.get("num_key_value_heads", 8))
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
    layout = Layout(make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1]), cfg.mesh.rules)
    params = {hf_config.param_path(k): np.asarray(v[...]) for k, v in jax.tree_util.tree_leaves_with_path(
        restore_params(cfg, layout, None)[0], is_leaf=convert._is_var)}
    weights = model.state_dict()
    for name, path, in_dims, layer, _ in convert.hf_tensors(cfg.model):
        ours = params[path] if layer is None else params[path][layer]
        assert ours.dtype == np.float32
        assert np.array_equal(convert.to_hf(ours, in_dims), weights[name].float().numpy()), name
    # transformers' float32 model of the same weights (model.float() would keep the rotary
    # frequencies that the cast to float16 rounded)
    import transformers
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype="float32")
    difference = np.abs(our_logits(run, TOKENS) - hf_logits(reference.eval(), TOKENS)).max()
    print(f"float16 checkpoint in float32: max |logit difference| {difference:.2e}")
    assert difference < 5e-5


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
    assert hf_config.import_dtype(stored, chosen) == (dtype, note)


def test_rope_scaling_changes_the_function():
    """The scaled-rope cases above would pass with scaling ignored if it changed nothing."""
    from pjit_llm.models.llama.config import ModelConfig
    from pjit_llm.models.llama.model import rope_angles
    pos = jnp.arange(40)[None]
    plain = rope_angles(pos, 8, 500.0)[0]
    llama3 = ModelConfig(embed_dim=64, rope_theta=500.0, rope_scaling="llama3", rope_factor=8.0,
                         rope_original_max_len=16)
    assert np.abs(rope_angles(pos, 8, 500.0, llama3)[0] - plain).max() > 0.1


def test_converted_model_generates_what_transformers_generates(tmp_path):
    from pjit_llm.inference.generator import Sampling, generate_texts
    model = hf_llama(tmp_path / "hf", seed=1)
    run = convert.import_hf(tmp_path / "hf", tmp_path / "run")
    prompt = "the cat sat on"
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(run / "tokenizer.json"))
    ids = tok.encode(prompt, add_special_tokens=False).ids
    model.generation_config.eos_token_id = None
    import torch
    out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    expected = tok.decode(out[0, len(ids):].tolist())
    assert generate_texts(run, [prompt], 8, Sampling()) == [expected]
    assert len(expected.split()) == 8 and set(expected.split()) <= set(WORDS)  # words, not ids


@pytest.mark.slow
def test_fine_tuned_export_loads_in_transformers_and_reimports_bit_identically(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_llama(tmp_path / "hf", num_key_value_heads=4, tie_word_embeddings=False)
    base = convert.import_hf(tmp_path / "hf", tmp_path / "base")
    tuned = run_cli("--config", str(base / "config.yaml"), f"train.init_from={base}",
                    "train.run_dir=tuned", "train.steps=3", "optimizer.warmup_steps=1",
                    "data.seq_len=32", "data.batch_size=8", "train.eval_every=0",
                    "train.sample_tokens=0", "train.eval_batches=1", "data.num_workers=0",
                    f"data.data_dir={tmp_path / 'data'}", cwd=tmp_path)
    assert tuned.returncode == 0, tuned.stderr
    assert f"initialised the parameters from {base} (step 0)" in tuned.stdout + tuned.stderr
    run = tmp_path / "tuned"
    wrong = run_cli("--config", str(base / "config.yaml"), f"train.init_from={base}",
                    "model.mlp_dim=256", "train.run_dir=wrong", f"data.data_dir={tmp_path / 'data'}",
                    cwd=tmp_path)
    assert wrong.returncode == 2 and wrong.stderr.strip().splitlines()[-1] == (
        f"error: train.init_from={base} has model.mlp_dim=128 but this run has 256; set "
        f"model.mlp_dim=128 (or start from --config {base / 'config.yaml'})")
    assert not (tmp_path / "wrong").exists()

    out, step = convert.export_hf(run, tmp_path / "out", None, None, shard_bytes=40_000)
    assert step == 3 and (out / safetensors_io.INDEX_FILE).is_file()
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "hf/tokenizer.json").read_bytes()
    model, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ours = our_logits(run, TOKENS)
    difference = np.abs(hf_logits(model.eval(), TOKENS) - ours).max()
    print(f"exported float32: max |logit difference| {difference:.2e}")
    assert difference < 5e-5

    again = convert.import_hf(out, tmp_path / "again")
    cfg = run_config(run)
    layout = Layout(make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1]), cfg.mesh.rules)
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


def test_init_from_restores_the_parameters_with_a_fresh_optimizer(tmp_path):
    from pjit_llm.training.loop import _init_from
    hf_llama(tmp_path / "hf", num_key_value_heads=4)
    base = convert.import_hf(tmp_path / "hf", tmp_path / "base")
    cfg = run_config(base, [f"train.init_from={base}", "train.run_dir=elsewhere"])
    parts = build_on(cfg, (2, 2, 2))
    abstract_state = parts.abstract_state
    state = _init_from(parts)
    imported, _ = restore_params(run_config(base), parts.layout, None)
    assert int(state.step) == 0
    for a, b, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(imported),
                          jax.tree.leaves(abstract_state.params), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b)) and a.sharding == want.sharding
    assert all(not np.asarray(m).any() for m in jax.tree.leaves(state.opt_state))
    other = run_config(base, [f"train.init_from={base}", "model.num_layers=3"])
    with pytest.raises(UserError, match="has model.num_layers=2 but this run has 3"):
        _init_from(build_on(other, (2, 2, 2)))


LLAMA = {"architectures": ["LlamaForCausalLM"], "vocab_size": 300, "hidden_size": 64,
         "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 8,
         "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}


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


def _write_hf(directory: Path, config: dict, drop=(), reshape=None):
    """A Llama directory written with our own writer (no torch), optionally damaged."""
    directory.mkdir()
    model, _ = hf_config.model_config(config, "x")
    specs = [(n, np.float32, reshape if n == "model.norm.weight" and reshape else s)
             for n, *_, s in convert.hf_tensors(model) if n not in drop]
    rng = np.random.default_rng(0)
    safetensors_io.write_dir(directory, specs, lambda n: rng.standard_normal(
        dict((a, c) for a, _, c in specs)[n], np.float32), shard_bytes=10**9)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("drop, reshape, message", [
    (("model.layers.1.mlp.up_proj.weight",), None, "tensor model.layers.1.mlp.up_proj.weight is missing"),
    ((), (63,), "tensor model.norm.weight has shape [63] but config.json implies [64]"),
])
def test_weights_that_do_not_match_the_config_are_refused(tmp_path, drop, reshape, message):
    _write_hf(tmp_path / "hf", {**LLAMA, "tie_word_embeddings": True}, drop, reshape)
    with pytest.raises(UserError) as e:
        convert.import_hf(tmp_path / "hf", tmp_path / "run")
    assert message in str(e.value)
    assert not (tmp_path / "run").exists() and [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_export_returns_the_directory_and_the_step_it_declares(tmp_path):
    _write_hf(tmp_path / "hf", LLAMA)
    run = convert.import_hf(tmp_path / "hf", tmp_path / "run")
    out, step = convert.export_hf(run, tmp_path / "out", None, None, shard_bytes=10**9)
    assert (out, step) == (tmp_path / "out", 0) and (out / "config.json").is_file()
    assert typing.get_type_hints(convert.export_hf)["return"] == tuple[Path, int]


def _convert_cli(*args, cwd, code=None):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    command = ["-c", code, *args] if code else ["-m", "pjit_llm.convert", *args]
    return subprocess.run([sys.executable, *command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_refuses_an_unsupported_architecture_in_one_line(tmp_path):
    _write_hf(tmp_path / "hf", LLAMA)
    config = json.loads((tmp_path / "hf/config.json").read_text())
    (tmp_path / "hf/config.json").write_text(json.dumps({**config, "architectures": ["Qwen2ForCausalLM"]}))
    result = _convert_cli("import", "--hf", "hf", "--out", "run", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'hf/config.json'}: architecture Qwen2ForCausalLM is not supported "
        "(only Llama-family decoders that this model computes exactly can be imported)"]
    assert not (tmp_path / "run").exists()


# Runs the converter's command in this process after measuring its memory with the libraries
# loaded, and prints the peak resident memory the conversion added (bytes). The peak is the
# kernel's high-water mark of this process (VmHWM): getrusage's ru_maxrss would also count
# the parent's memory at fork, which a pytest worker with torch loaded dwarfs.
MEASURE = """
import sys
import jax
from pjit_llm import convert
def status(key):
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024
jax.numpy.zeros(1).block_until_ready()
base = status("VmRSS")
convert.main(sys.argv[1:])
print(status("VmHWM") - base)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_conversion_memory_stays_near_one_parameter_not_the_model(tmp_path):
    config = {**LLAMA, "vocab_size": 8000, "hidden_size": 1024, "intermediate_size": 2816,
              "num_hidden_layers": 6, "num_attention_heads": 16, "num_key_value_heads": 4,
              "tie_word_embeddings": True}
    _write_hf(tmp_path / "hf", config)
    size = sum(p.stat().st_size for p in (tmp_path / "hf").glob("*.safetensors"))
    largest = 6 * 1024 * 2816 * 4  # one stacked MLP matrix: all layers of mlp.gate_proj
    assert size > 290e6
    imported = _convert_cli("import", "--hf", "hf", "--out", "run", cwd=tmp_path, code=MEASURE)
    assert imported.returncode == 0, imported.stderr
    exported = _convert_cli("export", "--run", "run", "--out", "out", "--shard-size", "100MB",
                            cwd=tmp_path, code=MEASURE)
    assert exported.returncode == 0, exported.stderr
    import_peak, export_peak = (int(r.stdout.strip().splitlines()[-1]) for r in (imported, exported))
    print(f"model {size / 1e6:.0f} MB, largest stacked parameter {largest / 1e6:.0f} MB; peak "
          f"added by import {import_peak / 1e6:.0f} MB, by export {export_peak / 1e6:.0f} MB")
    # Export never touches a device: the host holds one stacked parameter (read by Orbax)
    # and one layer of it being written, never the model.
    assert export_peak < 0.8 * size
    # Import builds one parameter on the devices (whose memory is the host's on CPU), reading
    # one layer at a time, saves it with Orbax's partial save and drops it before the next:
    # one stacked parameter plus Orbax's buffers, never the model.
    assert import_peak < 0.9 * size
    assert len(list((tmp_path / "out").glob("*.safetensors"))) == 4
