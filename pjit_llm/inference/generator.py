"""Generation with a key/value cache, on the mesh.

The prompts are run once (prefill), then the decode runs on the device, one compiled loop of
decode steps, without returning to Python between tokens. Greedy, or sampled with a
temperature, top-k and top-p, from a seed; stops at the end-of-document token or after
`max_new_tokens`. Parameters and cache live on the mesh (heads over `tensor`, prompts over
`data`), so a model that only fits sharded still generates. The loop reads the layers' weights
as one tree per layer and updates each layer's cache in place, so a step copies neither.
"""

import dataclasses
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pjit_llm.data.chat import chat_prompt, load_chat_template
from pjit_llm.errors import UserError
from pjit_llm.inference.loading import load_for_inference
from pjit_llm.models.decoder import cache_axes, init_cache, unstack_layers
from pjit_llm.models.families import abstract_model


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: all tokens
    top_p: float = 1.0
    seed: int = 0


def sample(logits_BV, key, sampling: Sampling):
    logits_BV = logits_BV.astype(jnp.float32)
    if sampling.temperature == 0:
        return jnp.argmax(logits_BV, axis=-1)
    logits_BV = logits_BV / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits_BV, sampling.top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
    if sampling.top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
        # the smallest logit still inside the nucleus (the top token always is)
        cutoff = jnp.take_along_axis(sorted_BV, jnp.sum(cumulative < sampling.top_p, axis=-1,
                                                        keepdims=True), axis=-1)
        logits_BV = jnp.where(logits_BV < cutoff, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1)


class Generator:
    """Compiled prefill and decode loop for one model, parameters and mesh.

    After the prefill, the decode runs on the device: a `lax.while_loop` of decode steps
    (sampling, end-token tracking and positions included) until every prompt has ended or a
    step limit is reached. Without streaming, one call decodes everything; streaming runs
    the same loop `stream_block` tokens at a time and hands those to the caller."""

    def __init__(self, model_cfg, layout, sampling: Sampling, stream_block: int = 8):
        if layout.shards("length") > 1:
            # The decode step writes one position of the cache at a time, which a cache whose
            # length is cut into context shards cannot take: those devices decode the same
            # rows instead, the cache's length whole on each (the rest of the mesh as it was).
            for axis in layout.mesh_axes("length"):
                layout = layout.without(axis)
        self.model_cfg, self.layout, self.sampling = model_cfg, layout, sampling
        unroll = model_cfg.decode_unroll
        self.stream_block = stream_block
        # The loop runs the model with one parameter tree per layer (`prepare`).
        graphdef, _ = abstract_model(model_cfg, layout, layer_list=True)
        layer_cache = layout.sharding(cache_axes(model_cfg, layout))
        self.cache_sharding = ({"k": layer_cache, "v": layer_cache},) * model_cfg.num_layers

        def step(params, tokens_BL, positions_BL, last_B, cache, key):
            logits_BLV, cache = nnx.merge(graphdef, params).decode(tokens_BL, positions_BL, cache)
            return sample(jnp_take_rows(logits_BLV, last_B), key, sampling), cache

        def record(state, token_B, eos_id):
            """Write this step's tokens at column `i` (-1 where a prompt has already ended) and
            mark the prompts that end here."""
            ended_B = token_B == eos_id if eos_id is not None else jnp.zeros_like(state["done"])
            shown_B = jnp.where(state["done"] | ended_B, -1, token_B)
            return {**state, "token": token_B, "done": state["done"] | ended_B,
                    "out": state["out"].at[:, state["i"]].set(shown_B), "i": state["i"] + 1}

        def prefill(params, tokens_BT, lengths_B, valid_B, cache, key, max_new, eos_id):
            """Run the right-padded prompts once; each row's first new token comes from its
            last real position (padding is overwritten by the tokens that follow)."""
            B, T = tokens_BT.shape
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
            key, sub = jax.random.split(key)
            token_B, cache = step(params, tokens_BT, positions_BT, lengths_B - 1, cache, sub)
            state = {"i": jnp.int32(0), "done": ~valid_B, "pos": lengths_B, "cache": cache,
                     "key": key, "out": jnp.full((B, max_new), -1, jnp.int32),
                     "token": token_B}
            return record(state, token_B, eos_id)

        def decode(params, state, stop, eos_id):
            """Decode steps until `stop` tokens are written or every prompt has ended: blocks
            of model.decode_unroll steps while they fit, then single steps. A GPU's loop
            reads its condition back to the host before every iteration, so each block spares
            that round trip (and the host's launches behind it) for all but one of its steps;
            a prompt that ends inside a block only has its block finished (written as -1)."""
            def room(steps):
                return lambda state: (state["i"] + steps <= stop) & ~jnp.all(state["done"])

            def one(state):
                key, sub = jax.random.split(state["key"])
                token_B, cache = step(params, state["token"][:, None], state["pos"][:, None],
                                      jnp.zeros_like(state["pos"]), state["cache"], sub)
                state = {**state, "key": key, "cache": cache, "pos": state["pos"] + 1}
                return record(state, token_B, eos_id)

            def block(state):
                for _ in range(unroll):
                    state = one(state)
                return state

            if unroll > 1:
                state = jax.lax.while_loop(room(unroll), block, state)
            return jax.lax.while_loop(room(1), one, state)

        self._prefill = jax.jit(prefill, static_argnums=(6, 7), donate_argnums=4)
        self._decode = jax.jit(decode, static_argnums=3, donate_argnums=1)
        self._init_cache = jax.jit(partial(init_cache, model_cfg, layout), static_argnums=(0, 1),
                                   out_shardings=self.cache_sharding)

    @staticmethod
    def prepare(params, donate: bool = False) -> "DecodeParams":
        """The model's parameters as the decode loop reads them, one tree per layer (see
        models.decoder.unstack_layers); with `donate` the stacked arrays are freed."""
        return DecodeParams(unstack_layers(params, donate))

    def generate(self, params, prompts: list[np.ndarray], max_new_tokens: int,
                 eos_id: int | None,
                 on_tokens: Callable[[np.ndarray], None] | None = None,
                 pad_to: tuple[int, int] = (0, 0)) -> list[list[int]]:
        """New tokens for each prompt (without the prompt, stopping before an end token), from
        the model's parameters or those of `prepare`. `on_tokens` sees each step's tokens (-1
        for prompts already finished), as they come off the device in blocks of
        `stream_block`. `pad_to` (rows, length): see `prefill`."""
        if not isinstance(params, DecodeParams):
            params = self.prepare(params)
        n = len(prompts)
        state = self.prefill(params, prompts, max_new_tokens, eos_id, pad_to)
        if on_tokens is None:
            state = self.decode(params, state, max_new_tokens, eos_id)
        else:
            shown = 0
            while True:
                written = int(state["i"])
                for column in np.asarray(state["out"][:n, shown:written]).T:
                    on_tokens(column)
                shown = written
                if written == max_new_tokens or bool(np.all(np.asarray(state["done"][:n]))):
                    break
                state = self.decode(params, state, min(written + self.stream_block,
                                                       max_new_tokens), eos_id)
        out = np.asarray(state["out"][:n])
        return [[int(t) for t in row if t >= 0] for row in out]

    def prefill(self, params: "DecodeParams", prompts: list[np.ndarray], max_new_tokens: int,
                eos_id: int | None, pad_to: tuple[int, int] = (0, 0)) -> dict:
        """The decode state after running the prompts: the first new token of each written.
        The batch is padded to at least `pad_to` (rows, length), so that callers holding those
        fixed reuse the compiled steps, and to split evenly over its mesh axes."""
        if any(len(p) == 0 for p in prompts):
            raise UserError("a prompt is empty; give at least one character")
        n, shards = len(prompts), self.layout.shards("batch")
        B = -(-max(n, pad_to[0]) // shards) * shards
        T = max(max(len(p) for p in prompts), pad_to[1])
        if T + max_new_tokens > self.model_cfg.max_len:
            raise UserError(f"prompt ({T} tokens) plus --max-new-tokens {max_new_tokens} exceeds "
                            f"model.max_len={self.model_cfg.max_len}")
        tokens, lengths = np.zeros((B, T), np.int32), np.ones(B, np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)], lengths[i] = p, len(p)
        cache = self._init_cache(B, T + max_new_tokens)
        tokens = jax.device_put(tokens, self.layout.sharding(("batch", "length")))
        return self._prefill(params.state, tokens, jnp.asarray(lengths), jnp.arange(B) < n, cache,
                             jax.random.key(self.sampling.seed), max_new_tokens, eos_id)

    def decode(self, params: "DecodeParams", state: dict, stop: int, eos_id: int | None) -> dict:
        """The state after decoding on the device until `stop` tokens are written (at most
        the prefill's `max_new_tokens`) or every prompt has ended; donates `state`."""
        return self._decode(params.state, state, stop, eos_id)


@dataclasses.dataclass(frozen=True)
class DecodeParams:
    """Parameters laid out for the decode loop (`Generator.prepare`)."""
    state: nnx.State


def jnp_take_rows(logits_BLV, index_B):
    return jnp.take_along_axis(logits_BLV, index_B[:, None, None], axis=1)[:, 0]


def generate_texts(run: Path, prompts: list[str], max_new_tokens: int, sampling: Sampling,
                   step: int | None = None, overrides=(), stream: bool = False,
                   quantize: str = "none", chat: bool = False) -> list[str]:
    """Continuations of `prompts` by the run directory (or export) `run` (its checkpoint
    `step`, default the latest) on the mesh of its config with `overrides`, with
    quantize="int8" its weights quantized to int8; with `stream`, the first prompt's text is
    printed as it is produced. With `chat`, each prompt is a user's message put through the
    tokenizer's chat template with the generation prompt, the reply stops at the template's
    end token, and only the reply is printed."""
    tokenizer, parts, params = load_for_inference(run, step, overrides, quantize)
    generator = Generator(parts.model, parts.layout, sampling)
    params = generator.prepare(params, donate=True)
    eos_id = tokenizer.eos_id
    if chat:
        if parts.cfg.data.tokenizer != "hf":
            raise UserError("--chat needs a run whose tokenizer is a Hugging Face tokenizer.json "
                            "with a chat template (data.tokenizer=hf)")
        template = load_chat_template(parts.cfg.data.tokenizer_path)
        prompts = [chat_prompt(template, p) for p in prompts]
        if template.eos_token is not None:  # the end of a turn, e.g. <|im_end|>
            eos_id = tokenizer.impl.token_to_id(template.eos_token)
            eos_id = tokenizer.eos_id if eos_id is None else eos_id
    ids = [tokenizer.encode(p) for p in prompts]
    streamed: list[int] = []

    def show(tokens):  # print the text as it grows, whole characters at a time
        if tokens[0] >= 0:
            before = tokenizer.decode(streamed)
            streamed.append(int(tokens[0]))
            sys.stdout.write(tokenizer.decode(streamed)[len(before):])
            sys.stdout.flush()

    if stream and not chat:
        sys.stdout.write(prompts[0])
    out = generator.generate(params, ids, max_new_tokens, eos_id, show if stream else None)
    if stream:
        sys.stdout.write("\n")
    return [tokenizer.decode(o) for o in out]
