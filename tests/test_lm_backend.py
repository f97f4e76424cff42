"""The lm-evaluation-harness backend on a small imported model (byte tokens), against the
model's own logits: log-likelihoods and greedy flags of padded, batched, sharded requests,
the step compiled once per padded length, rolling log-likelihoods, generation equal to the
generator's one prompt at a time, and one-line refusals. (Against lm-eval's hf backend on
an export: e2e/test_lm_eval_cli.py.)"""

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from hf_models import LLAMA, our_logits, write_hf  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from pjit_llm.errors import UserError  # noqa: E402
from pjit_llm.inference.lm_backend import PjitLM, _rows  # noqa: E402
from pjit_llm.interop import hf as convert  # noqa: E402


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    where = tmp_path_factory.mktemp("lm_backend")
    write_hf(where / "hf", LLAMA)
    run = convert.import_hf(where / "hf", where / "run")
    # 3 rows become 4 to split over data=4 (tensor=2 on the 8 test devices)
    return PjitLM(run=str(run), batch_size=3, max_length=64, **{"mesh.tensor": "2"}), run


def _log_softmax(logits):
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def _reference(run, sequences):
    """Per sequence, the log-probabilities (L-1, V) that each position gives the next token,
    from one forward pass of the right-padded rows (causal, so padding changes nothing)."""
    L = max(map(len, sequences))
    tokens = np.zeros((len(sequences), L), np.int32)
    for i, s in enumerate(sequences):
        tokens[i, :len(s)] = s
    logp = _log_softmax(our_logits(run, tokens))
    return [logp[i, :len(s) - 1] for i, s in enumerate(sequences)]


def test_loglikelihoods_match_the_model_and_compile_once_per_padded_length(backend):
    lm, run = backend
    rng = np.random.default_rng(0)
    requests = [(rng.integers(0, 300, c).tolist(), rng.integers(0, 300, n).tolist())
                for c, n in [(3, 1), (9, 4), (20, 2), (1, 30), (40, 5), (7, 7), (12, 1)]]
    reference = _reference(run, [c + n for c, n in requests])
    # a continuation that is the model's most likely next token: its flag must be True (the
    # positions up to the context's last see the same tokens as in request 1)
    context = requests[1][0]
    requests.append((context, [int(reference[1][len(context) - 1].argmax())]))
    reference.append(reference[1])

    out = lm._loglikelihood_tokens([(None, c, n) for c, n in requests], disable_tqdm=True)
    for (logprob, is_greedy), (c, n), logp in zip(out, requests, reference):
        positions = np.arange(len(c) - 1, len(c) + len(n) - 1)
        expected = logp[positions, n].sum()
        assert logprob == pytest.approx(expected, rel=1e-5, abs=1e-4)  # float32 on both sides
        assert is_greedy == bool(np.all(logp[positions].argmax(-1) == np.asarray(n)))
    assert out[-1][1] and not all(g for _, g in out)
    # 8 requests of lengths 3 to 44 in batches of 4 rows: padded to 16, 32 or 64 tokens
    assert lm._score._cache_size() <= 3


def test_rolling_loglikelihood_is_the_documents_log_probability_after_the_prefix(backend):
    lm, run = backend
    doc = "the cat sat on the mat"
    tokens = [lm.prefix_token_id] + lm.tok_encode(doc)
    (logp,) = _reference(run, [tokens])
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (doc,), 0)],
                                        disable_tqdm=True)
    assert total == pytest.approx(logp[np.arange(len(tokens) - 1), tokens[1:]].sum(), rel=1e-5, abs=1e-4)
    # in windows of 16 tokens every token is still predicted once, now with less context
    lm.max_length = 16
    try:
        (windowed,) = lm.loglikelihood_rolling(
            [Instance("loglikelihood_rolling", {}, (doc,), 0)], disable_tqdm=True)
    finally:
        lm.max_length = 64
    assert windowed != pytest.approx(total, abs=1e-6) and np.isfinite(windowed)


def test_generation_in_fixed_shapes_equals_the_generator_on_the_prompts_alone(backend):
    from pjit_llm.inference.generator import Generator, Sampling
    lm, _ = backend
    prompts = ["a", "the cat", "def f(x):", "a big red dog", "w"]
    kwargs = {"until": ["zz"], "max_gen_toks": 5, "do_sample": False}
    out = lm.generate_until([Instance("generate_until", {}, (p, dict(kwargs)), i)
                             for i, p in enumerate(prompts)], disable_tqdm=True)
    # the generator on exactly these prompts, unsorted, padded to their longest only
    alone = Generator(lm.parts.model, lm.parts.layout, Sampling()).generate(
        lm.params, [np.asarray(lm.tok_encode(p), np.int32) for p in prompts], 5, lm.eot_token_id)
    assert out == [lm.tok_decode(tokens).split("zz")[0] for tokens in alone]
    (generator,) = lm._generators.values()
    assert generator._prefill._cache_size() == 1  # both batches: 4 rows of 16 tokens
    stop = out[3][1:3]  # a stop string the model does produce cuts the text before it
    (cut,) = lm.generate_until([Instance("generate_until", {}, (prompts[3], {
        **kwargs, "until": [stop]}), 0)], disable_tqdm=True)
    assert cut == out[3][:out[3].index(stop)]
    assert generator._prefill._cache_size() == 1  # one prompt, still 4 rows of 16 tokens


def test_bad_arguments_are_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match="unknown --model_args pretrained"):
        PjitLM(run=str(tmp_path), pretrained="gpt2")
    with pytest.raises(UserError, match="needs --model_args run=DIR"):
        PjitLM()
    with pytest.raises(UserError, match="not a run directory"):
        PjitLM(run=str(tmp_path))
    with pytest.raises(UserError, match="--batch_size 0"):
        _rows("0", None, 2)
    assert _rows("auto", 6, 4) == 8 and _rows(5, None, 1) == 5


def test_the_command_module_registers_the_backend_beside_lm_evals_own():
    from lm_eval.api.registry import get_model, model_registry

    import pjit_llm.lm_eval  # noqa: F401
    assert get_model("pjit_llm") is PjitLM
    assert "hf" in model_registry and "vllm" in model_registry
