"""How fast generation runs: prefill time and TFLOP/s, decode tokens/s and time per output
token for each batch size, and the decode step's memory traffic, for our generator and, on
the same model and prompts, for transformers' `generate` (the `hf` extra).

A decode step reads every parameter and the whole key/value cache once, so at small batches
its speed is set by memory bandwidth: (parameter bytes + cache bytes) / step time, set against
the device's bandwidth where it is known.
"""

import dataclasses
import statistics
import time

import jax
import numpy as np

from pjit_llm import perf
from pjit_llm.checkpoint.runs import inference_params
from pjit_llm.config import Config
from pjit_llm.errors import UserError
from pjit_llm.inference.generator import Generator, Sampling
from pjit_llm.models.decoder_config import DecoderConfig
from pjit_llm.models.families import family_of
from pjit_llm.models.quantize import param_bytes
from pjit_llm.parallel.mesh import use_emulated_devices
from pjit_llm.placement import place


def random_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[np.ndarray]:
    """Prompts of random token ids (the bytes of a byte-level vocabulary), all `length` long."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, min(vocab, 256), length).astype(np.int32) for _ in range(batch)]


def measure_generation(generator: Generator, params, model: DecoderConfig, batch: int,
                       prompt_len: int, new_tokens: int, repeats: int) -> dict:
    """Median prefill and decode times of `repeats` generations of `new_tokens` greedy tokens
    (no end token: every row runs to the end) after one untimed generation that compiles."""
    prompts = random_prompts(batch, prompt_len, model.vocab_size)
    params = generator.prepare(params)
    generator.generate(params, prompts, new_tokens, None)
    prefills, decodes = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        state = jax.block_until_ready(generator.prefill(params, prompts, new_tokens, None))
        middle = time.perf_counter()
        state = jax.block_until_ready(generator.decode(params, state, new_tokens, None))
        prefills.append(middle - start)
        decodes.append(time.perf_counter() - middle)
    prefill_s, decode_s = statistics.median(prefills), statistics.median(decodes)
    steps = new_tokens - 1  # the first new token comes out of the prefill
    weights, cache = param_bytes(params.state), param_bytes(state["cache"])
    step_s = decode_s / steps
    bandwidth = perf.memory_bandwidth(jax.devices()[0].device_kind)
    traffic = (weights + cache) / step_s
    forward_flops = family_of(model).train_flops_per_token(model, prompt_len) / 3 * batch * prompt_len
    return {
        "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "prefill_s": prefill_s, "prefill_tflops": forward_flops / prefill_s / 1e12,
        "decode_s": decode_s, "decode_tokens_per_s": batch * steps / decode_s,
        "time_per_output_token_s": step_s,
        "param_bytes": weights, "cache_bytes": cache,
        "decode_bytes_per_s": traffic,
        "bandwidth_share": traffic / bandwidth if bandwidth else None,
    }


def generation_rows(cfg, params, layout, batches: list[int], prompt_len: int,
                    new_tokens: int, repeats: int) -> list[dict]:
    generator = Generator(cfg.model, layout, Sampling())
    return [measure_generation(generator, params, cfg.model, b, prompt_len, new_tokens, repeats)
            for b in batches]


def generation_bench(variants: list[tuple[str, Config]], from_run: bool, quantize: list[str],
                     batches: list[int], prompt_len: int, new_tokens: int,
                     repeats: int) -> tuple[list[dict], DecoderConfig]:
    """Rows of `generation_rows` for each variant (configs of a run, whose parameters are
    restored, or of a model with random weights) and each of `quantize` (int8: at load time,
    as generate and evaluate do); with the last variant's model config."""
    rows, model = [], None
    for name, cfg in variants:
        use_emulated_devices(cfg.mesh.emulate_devices)
        # Decoding attends over a cache under a general mask: XLA's attention.
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention="xla"))
        parts = place(cfg, batches=False)
        params = None if from_run else parts.init_params()
        for q in quantize:
            if from_run:
                params = inference_params(parts.cfg, parts.layout, None, q)[0]
            elif q != "none":
                raise UserError("--quantize needs --run: a checkpoint or export to quantize")
            label = " ".join(filter(None, [name, "" if q == "none" else q]))
            for r in generation_rows(parts.cfg, params, parts.layout, batches, prompt_len,
                                     new_tokens, repeats):
                rows.append({"variant": label or "base", "implementation": "pjit_llm",
                             "quantize": q, **r})
        model = parts.model
        del params
    return rows, model


def transformers_rows(hf_dir: str, batches: list[int], prompt_len: int, new_tokens: int,
                      repeats: int, vocab: int) -> list[dict]:
    """The same measurement for transformers' `generate` (greedy, key/value cache, float32 on
    the CPU) on a Hugging Face model directory: prefill is one forward pass of the prompts."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    rows = []
    for batch in batches:
        ids = torch.tensor(np.stack(random_prompts(batch, prompt_len, vocab)), dtype=torch.long)
        mask = torch.ones_like(ids)

        def run(n):
            return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=0)

        with torch.no_grad():
            run(new_tokens)  # warm-up
            prefills, totals = [], []
            for _ in range(repeats):
                start = time.perf_counter()
                model(ids, attention_mask=mask)
                prefills.append(time.perf_counter() - start)
                start = time.perf_counter()
                run(new_tokens)
                totals.append(time.perf_counter() - start)
        prefill_s = statistics.median(prefills)
        decode_s = max(statistics.median(totals) - prefill_s, 1e-9)
        rows.append({"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
                     "prefill_s": prefill_s, "decode_s": decode_s,
                     "decode_tokens_per_s": batch * (new_tokens - 1) / decode_s,
                     "time_per_output_token_s": decode_s / (new_tokens - 1)})
    return rows
