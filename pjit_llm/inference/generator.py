"""Generation with a key/value cache, on the mesh.

The prompts are run once (prefill), then one compiled decode step produces every further
token. Greedy, or sampled with a temperature, top-k and top-p, from a seed; stops at the
end-of-document token or after `max_new_tokens`. Parameters and cache live on the mesh
(heads over `tensor`, prompts over `data`), so a model that only fits sharded still generates.
"""

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pjit_llm.errors import UserError


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
    """Compiled prefill and decode step for one model, parameters and mesh."""

    def __init__(self, graphdef, model_cfg, layout, sampling: Sampling):
        self.model_cfg, self.layout, self.sampling = model_cfg, layout, sampling
        cache_sharding = layout.sharding(("layers", "batch", "length", "kv_heads", "head_dim"))
        self.cache_sharding = {"k": cache_sharding, "v": cache_sharding}

        def step(params, tokens_BL, positions_BL, last_B, cache, key):
            logits_BLV, cache = nnx.merge(graphdef, params).decode(tokens_BL, positions_BL, cache)
            logits_BV = jnp_take_rows(logits_BLV, last_B)
            return sample(logits_BV, key, sampling), cache

        self._step = jax.jit(step, donate_argnums=4,
                             out_shardings=(layout.replicated(), self.cache_sharding))
        self._init_cache = jax.jit(
            lambda params, batch, length: nnx.merge(graphdef, params).init_cache(batch, length),
            static_argnums=(1, 2), out_shardings=self.cache_sharding)

    def generate(self, params, prompts: list[np.ndarray], max_new_tokens: int,
                 eos_id: int | None,
                 on_tokens: Callable[[np.ndarray], None] | None = None) -> list[list[int]]:
        """New tokens for each prompt (without the prompt, stopping before an end token).
        `on_tokens` sees each step's tokens (-1 for prompts already finished)."""
        if any(len(p) == 0 for p in prompts):
            raise UserError("a prompt is empty; give at least one character")
        n, shards = len(prompts), self.layout.shards("batch")
        B = -(-n // shards) * shards  # pad the batch to split evenly over its mesh axes
        T = max(len(p) for p in prompts)
        if T + max_new_tokens > self.model_cfg.max_len:
            raise UserError(f"prompt ({T} tokens) plus --max-new-tokens {max_new_tokens} exceeds "
                            f"model.max_len={self.model_cfg.max_len}")
        tokens, lengths = np.zeros((B, T), np.int32), np.ones(B, np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)], lengths[i] = p, len(p)
        batch = self.layout.sharding(("batch", "length"))
        cache = self._init_cache(params, B, T + max_new_tokens)
        key = jax.random.key(self.sampling.seed)
        # Prefill: the whole (right-padded) prompts; each row's next token comes from its
        # last real position. Padding is overwritten by the tokens that follow.
        positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
        key, sub = jax.random.split(key)
        next_B, cache = self._step(params, jax.device_put(tokens, batch),
                                   jax.device_put(positions, batch), jnp.asarray(lengths - 1),
                                   cache, sub)
        out, done, pos = [[] for _ in range(n)], np.zeros(n, bool), lengths.copy()
        for step in range(max_new_tokens):
            new = np.asarray(next_B).astype(np.int32)
            ended = np.zeros(n, bool) if eos_id is None else new[:n] == eos_id
            shown = np.where(done | ended, -1, new[:n])
            for i in np.flatnonzero(shown >= 0):
                out[i].append(int(new[i]))
            done |= ended
            if on_tokens:
                on_tokens(shown)
            if done.all() or step == max_new_tokens - 1:
                break
            key, sub = jax.random.split(key)
            next_B, cache = self._step(params, jax.device_put(new[:, None], batch),
                                       jax.device_put(pos[:, None], batch),
                                       jnp.zeros(B, jnp.int32), cache, sub)
            pos = pos + 1
        return out


def jnp_take_rows(logits_BLV, index_B):
    return jnp.take_along_axis(logits_BLV, index_B[:, None, None], axis=1)[:, 0]


def generate_texts(run: Path, prompts: list[str], max_new_tokens: int, sampling: Sampling,
                   step: int | None = None, overrides=(), emulate_devices: int = 0,
                   stream: bool = False, quantize: str = "none") -> list[str]:
    """Continuations of `prompts` by the run directory (or export) `run` (its checkpoint
    `step`, default the latest) on the mesh of its config with `overrides`, with
    quantize="int8" its weights quantized to int8; with `stream`, the first prompt's text is
    printed as it is produced."""
    from pjit_llm.checkpoint.runs import inference_params, run_config
    from pjit_llm.data.tokenizer import load_tokenizer
    from pjit_llm.parallel.mesh import use_emulated_devices
    from pjit_llm.training.build import build

    cfg = run_config(run, overrides, emulate_devices)
    use_emulated_devices(cfg.mesh.emulate_devices)
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path, _dataset_dir(cfg))
    # Decoding attends over a cache under a general mask, which XLA's kernel does: there is no
    # kernel to choose (and no line about it in the generated text).
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention="xla"))
    parts = build(cfg, tokenizer.vocab_size)
    params, _, _ = inference_params(parts.cfg, parts.layout, step, quantize)
    generator = Generator(parts.graphdef, parts.model, parts.layout, sampling)
    ids = [tokenizer.encode(p) for p in prompts]
    streamed: list[int] = []

    def show(tokens):  # print the text as it grows, whole characters at a time
        if tokens[0] >= 0:
            before = tokenizer.decode(streamed)
            streamed.append(int(tokens[0]))
            sys.stdout.write(tokenizer.decode(streamed)[len(before):])
            sys.stdout.flush()

    if stream:
        sys.stdout.write(prompts[0])
    out = generator.generate(params, ids, max_new_tokens, tokenizer.eos_id, show if stream else None)
    if stream:
        sys.stdout.write("\n")
    return [tokenizer.decode(o) for o in out]


def _dataset_dir(cfg):
    """Where a SentencePiece model trained beside the data lives (only that needs it)."""
    if cfg.data.tokenizer != "sentencepiece" or cfg.data.tokenizer_path:
        return None
    from pjit_llm.data.sources import prepare
    return prepare(cfg.data).directory
