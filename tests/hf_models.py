"""Small Llama models in Hugging Face's format for the conversion tests: random ones saved by
transformers itself (the `hf` extra), or written by our own safetensors writer (no torch),
and the logits of both sides."""

import copy
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import build_on
from pjit_llm.checkpoint.run_dir import run_config
from pjit_llm.checkpoint.runs import restore_params
from pjit_llm.interop import hf as convert
from pjit_llm.interop import safetensors_io
from pjit_llm.models.loss import objective_terms
from pjit_llm.models.llama import hf as hf_config

WORDS = ["[UNK]", "the", "cat", "sat", "on", "a", "mat", "dog", "ran", "to", "red", "big",
         "and", "of", "in", "it", "is", "was", "def", "return"]
WORDS += [f"w{i}" for i in range(len(WORDS), 300)]  # every id of the model is a word
TOKENS = np.random.default_rng(0).integers(0, 300, (2, 48)).astype(np.int32)


def hf_llama(directory: Path, seed=0, dtype=None, **overrides):
    """A small random LlamaForCausalLM saved (in `dtype`, default float32) with a word-level
    tokenizer.json beside it."""
    settings = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                    initializer_range=0.1, rms_norm_eps=1e-5, tie_word_embeddings=True)
    return hf_random("Llama", directory, {**settings, **overrides}, seed, dtype)


def hf_qwen3(directory: Path, seed=0, dtype=None, **overrides):
    """A small random Qwen3ForCausalLM: a head size (32) that is not width / heads (16), an
    odd vocabulary (300 words and 3 more ids), grouped-query heads."""
    settings = dict(vocab_size=303, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                    max_position_embeddings=256, initializer_range=0.1, rms_norm_eps=1e-6,
                    rope_theta=1000000.0, tie_word_embeddings=True)
    return hf_random("Qwen3", directory, {**settings, **overrides}, seed, dtype)


def hf_gemma3(directory: Path, seed=0, dtype=None, **overrides):
    """A small random Gemma3ForCausalLM (the text decoder): two local layers then a global
    one, repeated, with a window (8) shorter than the test sequences, a query scale
    (query_pre_attn_scalar 24) other than the head size's (32), linear rope scaling on the
    global layers only, an odd vocabulary."""
    settings = dict(vocab_size=303, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                    max_position_embeddings=256, initializer_range=0.1, rms_norm_eps=1e-6,
                    sliding_window=8, sliding_window_pattern=3, query_pre_attn_scalar=24,
                    rope_theta=1000000.0, rope_local_base_freq=10000.0,
                    rope_scaling={"rope_type": "linear", "factor": 2.0},
                    tie_word_embeddings=True)
    return hf_random("Gemma3", directory, {**settings, **overrides}, seed, dtype)


def hf_mixtral(directory: Path, seed=0, dtype=None, **overrides):
    """A small random MixtralForCausalLM: 4 experts, 2 per token, grouped-query heads, an odd
    vocabulary, untied embeddings."""
    settings = dict(vocab_size=303, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    initializer_range=0.1, rms_norm_eps=1e-5, num_local_experts=4,
                    num_experts_per_tok=2, router_aux_loss_coef=0.02)
    return hf_random("Mixtral", directory, {**settings, **overrides}, seed, dtype)


def hf_qwen3_moe(directory: Path, seed=0, dtype=None, **overrides):
    """A small random Qwen3MoeForCausalLM: 8 experts of width 48 (not intermediate_size), 3
    per token, their probabilities not renormalised, a head size (32) other than width / heads."""
    settings = dict(vocab_size=303, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                    max_position_embeddings=256, initializer_range=0.1, rms_norm_eps=1e-6,
                    rope_theta=1000000.0, tie_word_embeddings=True, num_experts=8,
                    num_experts_per_tok=3, moe_intermediate_size=48, norm_topk_prob=False,
                    decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.01)
    return hf_random("Qwen3Moe", directory, {**settings, **overrides}, seed, dtype)


def hf_qwen3_moe_mixed(directory: Path, seed=0, dtype=None, **overrides):
    """`hf_qwen3_moe` with dense layers between the sparse ones: 6 layers, every second a
    mixture of experts (decoder_sparse_step 2) except layer 3 (mlp_only_layers), so dense,
    sparse, dense x 3, sparse; the dense MLPs intermediate_size (128) wide."""
    return hf_qwen3_moe(directory, seed, dtype, **{
        "num_hidden_layers": 6, "decoder_sparse_step": 2, "mlp_only_layers": [3], **overrides})


def hf_random(kind: str, directory: Path, settings: dict, seed=0, dtype=None):
    """transformers' `<kind>ForCausalLM` with random weights from `seed`, saved with a
    word-level tokenizer.json beside it."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    torch.manual_seed(seed)
    settings = copy.deepcopy(settings)  # transformers edits rope dicts in place
    config = getattr(transformers, "Gemma3TextConfig" if kind == "Gemma3" else f"{kind}Config")(
        **settings)
    model = getattr(transformers, f"{kind}ForCausalLM")(config).eval()
    if dtype:
        model = model.to(getattr(torch, dtype))
    model.save_pretrained(directory)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    return model


def greedy_texts(model, run: Path, new_tokens: int, prompt: str = "the cat sat on"):
    """(transformers' greedy continuation of `prompt`, ours from the run directory), as text
    decoded by the run's tokenizer."""
    import torch
    from tokenizers import Tokenizer

    from pjit_llm.inference.generator import Sampling, generate_texts
    tok = Tokenizer.from_file(str(run / "tokenizer.json"))
    ids = tok.encode(prompt, add_special_tokens=False).ids
    model.generation_config.eos_token_id = None
    out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    ours, = generate_texts(run, [prompt], new_tokens, Sampling())
    return tok.decode(out[0, len(ids):].tolist()), ours


def hf_logits(model, tokens):
    import torch
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def our_logits(run: Path, tokens, mesh=None, padded=False, overrides=()):
    """Our logits for `tokens` from the run directory's latest parameters, restored onto a
    mesh of these sizes (None: one device) with the config's `overrides` (a pipeline's
    micro-batches, say): over the true vocabulary, or with `padded` over the padded one."""
    parts = build_on(run_config(run, overrides), mesh)
    params = parts.to_run_order(restore_params(parts.cfg, parts.layout, None)[0])
    graphdef = parts.graphdef
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t, jnp.ones_like(t), positions))
    logits = np.asarray(forward(params, jnp.asarray(tokens)), np.float32)
    return logits if padded else logits[..., :parts.model.true_vocab]


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
LLAMA = {"architectures": ["LlamaForCausalLM"], "vocab_size": 300, "hidden_size": 64,
         "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 8,
         "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}


def write_hf(directory: Path, config: dict, drop=(), reshape=None):
    """A Llama directory written with our own writer (no torch), optionally damaged."""
    directory.mkdir()
    model, _ = hf_config.model_config(config, "x")
    specs = [(n, np.float32, reshape if n == "model.norm.weight" and reshape else s)
             for n, *_, s in convert.hf_tensors(model) if n not in drop]
    rng = np.random.default_rng(0)
    safetensors_io.write_dir(directory, specs, lambda n: rng.standard_normal(
        dict((a, c) for a, _, c in specs)[n], np.float32), shard_bytes=10**9)
    (directory / "config.json").write_text(json.dumps(config))



# A chat template in the style of Zephyr's: special tokens around each turn, the reply closed
# by the end token, and transformers' `{% generation %}` marking what the assistant says.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|> {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}<|assistant|> {% generation %}{{ m['content'] }} "
    "{{ eos_token }}{% endgeneration %}\n"
    "{% else %}{{ raise_exception('roles must be user or assistant, not ' + m['role']) }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")
CHAT_SPECIALS = ["<s>", "</s>", "<|user|>", "<|assistant|>"]  # ids 300-303


def chat_tokenizer(directory: Path, template: str | None = CHAT_TEMPLATE) -> Path:
    """The word-level tokenizer of `hf_llama` plus the chat special tokens (a model needs a
    vocabulary of at least 304), with tokenizer_config.json holding `template`; returns the
    tokenizer.json path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(CHAT_SPECIALS)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
              "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True}, "unk_token": "[UNK]"}
    if template is not None:
        config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory / "tokenizer.json"


def objectives_of_both(model, run: Path, tokens):
    """A mixture of experts' training loss on `tokens` as transformers computes it
    (output_router_logits: cross-entropy + router_aux_loss_coef x aux_loss) and as ours does:
    (transformers' output, our objective and our cross-entropy per predicted token, our
    metrics)."""
    import torch
    with torch.no_grad():
        out = model(torch.tensor(tokens, dtype=torch.long),
                    labels=torch.tensor(tokens, dtype=torch.long), output_router_logits=True)
    parts = build_on(run_config(run))
    params, _ = restore_params(parts.cfg, parts.layout, None)
    batch = {"tokens": jnp.asarray(tokens), "segment_ids": jnp.ones_like(tokens),
             "positions": jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)}
    objective, (count, loss_sum, metrics) = jax.jit(
        lambda p, b: objective_terms(parts.graphdef, p, b))(params, batch)
    return out, float(objective / count), float(loss_sum / count), metrics
