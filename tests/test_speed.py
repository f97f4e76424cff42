"""The generation measurement: real prefill and decode of our generator (no speed is
asserted: figures live in BENCHMARKS.md), its byte accounting, and the same measurement of
transformers' generate on a Hugging Face model."""

import jax
import pytest

from conftest import build_on, tiny_config
from hf_models import hf_llama
from pjit_llm.inference.speed import generation_rows, transformers_rows


def test_generation_rows_measure_the_real_generator():
    parts = build_on(tiny_config(), fsdp=2, tensor=4)
    params = parts.init_state().params
    rows = generation_rows(parts.cfg, params, parts.layout, [1, 4],
                           prompt_len=5, new_tokens=6, repeats=2)
    assert [r["batch"] for r in rows] == [1, 4]
    m = parts.model
    for r in rows:
        assert r["prefill_s"] > 0 and r["decode_tokens_per_s"] > 0
        assert r["time_per_output_token_s"] == pytest.approx(r["decode_s"] / 5)
        # The cache: keys and values of every layer, for the batch (padded to its 2 batch
        # shards) and prompt + new tokens, in float32.
        padded = max(r["batch"], 2)
        assert r["cache_bytes"] == 2 * m.num_layers * padded * 11 * m.num_kv_heads * m.head_size * 4
        assert r["param_bytes"] == sum(x.nbytes for x in jax.tree.leaves(params))
        assert r["bandwidth_share"] is None  # a CPU's bandwidth is not in the table


def test_transformers_rows_time_hugging_face_generate(tmp_path):
    hf_llama(tmp_path / "hf")
    rows = transformers_rows(str(tmp_path / "hf"), [1, 2], prompt_len=4, new_tokens=5,
                             repeats=1, vocab=300)
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["decode_tokens_per_s"] > 0 and r["prefill_s"] > 0 for r in rows)
