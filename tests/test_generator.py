"""Generation with a key/value cache: equal to full recomputation, sharded or not; sampling
reproducible from its seed; stops at the end token; int8 weights generate alike on any mesh.
(The command: e2e/test_generate_cli.py.)"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import build_on, tiny_config
from pjit_llm.inference.generator import Generator, Sampling, sample
from pjit_llm.models.decoder import init_cache
from pjit_llm.models.families import abstract_model
from pjit_llm.models.llama.model import QUANTIZED_WEIGHTS
from pjit_llm.models.quantize import Int8Weight, quantize_params

PROMPTS = [np.array([10, 11, 12], np.int32), np.array([40, 41, 42, 43, 44, 45, 46], np.int32),
           np.array([200], np.int32)]


@pytest.fixture(scope="module")
def trained():
    """A tiny model trained for 40 steps to continue counting sequences (t, t+1, ...)."""
    cfg = tiny_config("optimizer.lr=1e-2", "train.steps=40")
    parts = build_on(cfg, data=2, fsdp=2, tensor=2)
    graphdef, state, step = parts.graphdef, parts.init_state(), parts.train_step
    rng = np.random.default_rng(0)
    for _ in range(40):
        starts = rng.integers(0, 200, (16, 1))
        batch = {"tokens": (starts + np.arange(32)).astype(np.int32),
                 "segment_ids": np.ones((16, 32), np.int32),
                 "positions": np.tile(np.arange(32, dtype=np.int32), (16, 1))}
        state, metrics = step(state, jax.device_put(batch, parts.batch_sharding))
    assert float(metrics["loss"]) < 2.0
    return cfg, graphdef, jax.device_get(state.params)


def _on(cfg, params, shape):
    """(layout, graphdef, params placed) on a mesh of these sizes (None: one device)."""
    parts = build_on(cfg, shape)
    placed = jax.tree.map(lambda p, s: jax.device_put(p, s), params, parts.shardings.params)
    return parts.layout, parts.graphdef, placed


def greedy_without_cache(graphdef, params, prompts, n) -> list[list[int]]:
    """Reference: recompute the whole sequence for every new token. One compiled forward over
    a fixed length serves every step: causal attention keeps each position blind to the
    padding after it."""
    forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(
        t, jnp.ones_like(t), jnp.arange(t.shape[1])[None]))
    length = max(len(p) for p in prompts) + n
    out = []
    for prompt in prompts:
        seq = np.zeros((1, length), np.int32)
        seq[0, :len(prompt)] = prompt
        for i in range(len(prompt), len(prompt) + n):
            seq[0, i] = int(jnp.argmax(forward(params, jnp.asarray(seq))[0, i - 1]))
        out.append(seq[0, len(prompt):len(prompt) + n].tolist())
    return out


def test_cached_greedy_equals_full_recompute_sharded_and_on_one_device(trained):
    cfg, _, params = trained
    _, graphdef1, params1 = _on(cfg, params, None)
    expected = greedy_without_cache(graphdef1, params1, PROMPTS, 12)
    assert expected[0][:4] == [13, 14, 15, 16]  # it learned to count: the test means something
    for shape in (None, {"fsdp": 2, "tensor": 4}, {"data": 2, "tensor": 4}):
        layout, graphdef, placed = _on(cfg, params, shape)
        out = Generator(cfg.model, layout, Sampling()).generate(placed, PROMPTS, 12, eos_id=None)
        assert out == expected, shape


def test_sampling_is_reproducible_from_the_seed(trained):
    cfg, _, params = trained
    layout, graphdef, placed = _on(cfg, params, {"fsdp": 2, "tensor": 4})
    run = lambda seed, **kw: Generator(cfg.model, layout, Sampling(  # noqa: E731
        temperature=1.5, seed=seed, **kw)).generate(placed, PROMPTS, 16, eos_id=None)
    assert run(3) == run(3)
    assert run(3) != run(4)
    top1 = run(5, top_k=1)  # top-k of 1 is greedy whatever the temperature
    assert top1 == Generator(cfg.model, layout, Sampling()).generate(placed, PROMPTS, 16, None)
    nucleus = run(5, top_p=1e-6)  # a vanishing nucleus keeps only the top token
    assert nucleus == top1


def test_generation_stops_at_the_end_token(trained):
    cfg, _, params = trained
    layout, graphdef, placed = _on(cfg, params, None)
    free = Generator(cfg.model, layout, Sampling()).generate(placed, PROMPTS[:1], 8, None)
    stop_at = free[0][3]
    out = Generator(cfg.model, layout, Sampling()).generate(placed, PROMPTS[:1], 8, stop_at)
    assert out == [free[0][:3]]


def test_training_samples_follow_the_sample_keys_and_the_seed(trained):
    from pjit_llm.training.actions import sample_generator
    cfg, _, params = trained
    layout, graphdef, placed = _on(cfg, params, {"fsdp": 2, "tensor": 4})
    run = lambda *keys: sample_generator(tiny_config(*keys), layout).generate(  # noqa: E731
        placed, PROMPTS, 16, eos_id=None)
    greedy = Generator(cfg.model, layout, Sampling()).generate(placed, PROMPTS, 16, None)
    assert run("train.sample_temperature=0", "train.seed=1") == greedy
    hot = ("train.sample_temperature=1.5", "train.sample_top_p=1")
    assert run(*hot, "train.seed=1") == run(*hot, "train.seed=1")
    assert run(*hot, "train.seed=1") != run(*hot, "train.seed=2") != greedy
    assert run(*hot, "train.sample_top_p=1e-6", "train.seed=1") == greedy  # top_p reaches it


def host_loop(graphdef, params, model_cfg, prompt, n, sampling) -> list[int]:
    """Reference: one prompt, one compiled decode step per token called from Python, with the
    generator's key sequence (one split for the prefill, one per step), on the stacked layers
    as training holds them (the generator runs them as a layer list)."""
    step = jax.jit(lambda p, t, pos, c, k: _sampled(nnx.merge(graphdef, p).decode(t, pos, c), k,
                                                     sampling))
    cache = init_cache(model_cfg, None, 1, len(prompt) + n)
    key, sub = jax.random.split(jax.random.key(sampling.seed))
    token, cache = step(params, jnp.asarray(prompt)[None], jnp.arange(len(prompt))[None], cache,
                        sub)
    out = [int(token)]
    for i in range(n - 1):
        key, sub = jax.random.split(key)
        token, cache = step(params, jnp.full((1, 1), out[-1]), jnp.full((1, 1), len(prompt) + i),
                            cache, sub)
        out.append(int(token))
    return out


def _sampled(decoded, key, sampling):
    logits_1LV, cache = decoded
    return sample(logits_1LV[:, -1], key, sampling)[0], cache


@pytest.mark.parametrize("mesh", [None, {"fsdp": 2, "tensor": 4}, {"data": 2, "tensor": 4}])
def test_the_device_loop_equals_a_host_loop_token_for_token(trained, mesh):
    cfg, _, params = trained
    layout, graphdef, placed = _on(cfg, params, mesh)
    greedy, hot = Sampling(), Sampling(temperature=2.0, seed=7)
    for sampling in (greedy, hot):
        whole = Generator(cfg.model, layout, sampling).generate(placed, PROMPTS, 12, None)
        if mesh is None:  # the random draws depend on the batch's shape: one prompt alone
            alone = Generator(cfg.model, layout, sampling).generate(
                placed, PROMPTS[:1], 12, None)
            reference = host_loop(graphdef, placed, cfg.model, PROMPTS[0], 12, sampling)
            assert alone[0] == reference, sampling
        steps = []  # streaming: back on the host after every 5 tokens
        streamed = Generator(cfg.model, layout, sampling, stream_block=5)
        out = streamed.generate(placed, PROMPTS, 12, None, on_tokens=steps.append)
        assert out == whole, (mesh, sampling)
        assert len(steps) == 12 and [int(t[0]) for t in steps] == whole[0]
    greedy_out = Generator(cfg.model, layout, greedy).generate(placed, PROMPTS, 12, None)
    assert whole != greedy_out  # the seeded run really sampled


def test_each_prompt_stops_at_its_own_end_token(trained):
    cfg, _, params = trained
    layout, graphdef, placed = _on(cfg, params, None)
    free = Generator(cfg.model, layout, Sampling()).generate(placed, PROMPTS, 8, None)
    eos = free[1][2]  # ends the second prompt after two tokens
    assert all(eos not in row for i, row in enumerate(free) if i != 1)
    out = Generator(cfg.model, layout, Sampling()).generate(placed, PROMPTS, 8, eos)
    assert out == [free[0], free[1][:2], free[2]]


def test_decoding_in_unrolled_blocks_changes_no_token(trained):
    """Blocks of 3 steps: 8 new tokens are two blocks and two single steps. Seeded sampling
    draws the same tokens; each prompt still stops at its own end token (one that ends a
    prompt inside a block), and streaming hands over the same tokens."""
    cfg, _, params = trained
    layout, graphdef, placed = _on(cfg, params, {"fsdp": 2, "tensor": 4})
    unrolled = dataclasses.replace(cfg.model, decode_unroll=3)
    hot = Sampling(temperature=1.5, seed=7)
    single = Generator(cfg.model, layout, hot).generate(placed, PROMPTS, 8, None)
    blocks = Generator(unrolled, layout, hot, stream_block=5)
    assert blocks.generate(placed, PROMPTS, 8, None) == single
    eos = single[1][4]
    assert blocks.generate(placed, PROMPTS, 8, eos) == [
        row[:row.index(eos)] if eos in row else row for row in single]
    streamed = []
    blocks.generate(placed, PROMPTS, 8, None, on_tokens=streamed.append)
    assert [[int(t[i]) for t in streamed] for i in range(len(PROMPTS))] == single


def test_int8_weights_quantized_on_any_mesh_generate_the_same_counts(trained):
    cfg, _, params = trained
    outs = []
    for shape in (None, {"fsdp": 2, "tensor": 4}, {"data": 2, "tensor": 4}):
        layout, graphdef, placed = _on(cfg, params, shape)
        _, abstract = abstract_model(cfg.model, layout)
        int8 = quantize_params(placed, layout, QUANTIZED_WEIGHTS, abstract)
        assert isinstance(int8["blocks"]["attn"]["wq"][...], Int8Weight)
        outs.append(Generator(cfg.model, layout, Sampling()).generate(
            int8, PROMPTS, 12, eos_id=None))
    assert outs[0] == outs[1] == outs[2]
    assert outs[0][0][:4] == [13, 14, 15, 16]  # it still counts


def test_padding_ids_are_never_sampled_and_repeated_kv_heads_decode_alike(trained):
    """model.real_vocab_size=300 of 384: hot sampling, which would draw ids 300-383 about
    once in three tokens if they counted, never returns one; on 8 tensor shards (the 4
    key/value heads repeated, the cache holding one per shard) greedy decoding equals one
    device's."""
    cfg, _, params = trained
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, real_vocab_size=300))
    layout, graphdef, placed = _on(cfg, params, {"tensor": 8})
    hot = Generator(cfg.model, layout, Sampling(temperature=50.0, seed=3))
    assert tuple(hot.cache_sharding[0]["k"].spec)[2] == "tensor"  # 8 repeated heads, one a shard
    drawn = sum(hot.generate(placed, PROMPTS, 24, None), [])
    assert len(drawn) == 72 and max(drawn) < 300 and len(set(drawn)) > 30
    greedy = Generator(cfg.model, layout, Sampling()).generate(placed, PROMPTS, 12, None)
    layout1, _, placed1 = _on(cfg, params, None)
    assert greedy == Generator(cfg.model, layout1, Sampling()).generate(
        placed1, PROMPTS, 12, None)
