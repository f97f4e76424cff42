"""A model backend for EleutherAI's lm-evaluation-harness (the `lm-eval` extra).

`PjitLM` answers the harness's three requests from a run directory or an export, on the mesh
of its config: `loglikelihood` and `loglikelihood_rolling` through one compiled scoring step
(inference/evaluation.py's `make_score_step`), `generate_until` through the KV-cache
generator (inference/generator.py). Requests go in batches of a fixed number of rows,
right-padded to a length from a short ladder of powers of two, so each step compiles once per
length rather than once per batch. Text is split into tokens the way lm-eval's own `hf`
backend splits it (context and continuation encoded together, then cut), so both score the
same tokens. pjit_llm/lm_eval.py registers the backend under the name `pjit_llm`.
"""

from pathlib import Path

import jax
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from pjit_llm.data.tokenizer import HFTokenizer
from pjit_llm.errors import UserError
from pjit_llm.inference.evaluation import make_score_step
from pjit_llm.inference.generator import Generator, Sampling
from pjit_llm.inference.loading import load_for_inference

_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
MIN_LENGTH = 16  # the shortest padded length: shorter ones would only add compilations
ARGUMENTS = ("run", "step", "quantize", "emulate_devices", "max_length", "max_gen_toks",
             "prefix_token_id", "add_bos_token", "batch_size", "max_batch_size", "device")


class PjitLM(TemplateLM):
    """`--model_args run=DIR[,step=S][,quantize=int8][,batch_size=N][,max_length=N]
    [,max_gen_toks=N][,add_bos_token=True][,prefix_token_id=N][,emulate_devices=N]` plus
    any config override written with its dotted name (`mesh.tensor=2`)."""

    def __init__(self, run: str | None = None, step: int | None = None, quantize: str = "none",
                 emulate_devices: int = 0, max_length: int | None = None,
                 max_gen_toks: int = 256, prefix_token_id: int | None = None,
                 add_bos_token: bool = False, batch_size: int | str = 16,
                 max_batch_size: int | None = None, device: str | None = None, **overrides):
        super().__init__()
        unknown = [k for k in overrides if "." not in k]
        if unknown:
            raise UserError(f"unknown --model_args {', '.join(unknown)} for pjit_llm; it takes "
                            f"{', '.join(ARGUMENTS)} and config overrides such as mesh.tensor=2")
        if not run:
            raise UserError("the pjit_llm backend needs --model_args run=DIR (a training run "
                            "directory or an export)")
        emulate = {"mesh.emulate_devices": int(emulate_devices)} if int(emulate_devices) else {}
        self.tok, self.parts, self.params = load_for_inference(
            Path(run), step, [f"{k}={v}" for k, v in {**overrides, **emulate}.items()], quantize)
        if self.parts.pipeline is not None:
            raise UserError("the pjit_llm backend runs the layers one after another: pass "
                            "mesh.stage=1 (and the other mesh sizes to match) in --model_args")
        if add_bos_token and not isinstance(self.tok, HFTokenizer):
            raise UserError("add_bos_token=True needs a Hugging Face tokenizer.json "
                            "(data.tokenizer=hf); this run's tokenizer adds none")
        self.add_bos_token = bool(add_bos_token)
        self.model_max = self.parts.model.max_len
        self.max_length = min(int(max_length or self.model_max), self.model_max)
        self.max_gen_toks = int(max_gen_toks)
        self._prefix = prefix_token_id
        self.rows = _rows(batch_size, max_batch_size, self.parts.layout.shards("batch"))
        self._score = make_score_step(self.parts.graphdef, self.parts.layout)
        self._token_sharding = self.parts.layout.sharding(("batch", "length"))
        self._generators = {}  # one per sampling setting: each compiles its own loop
        self._decode_params = None  # the parameters laid out for decoding, on first use

    # -- tokens ----------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int | None:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context is conditioned on: as lm-eval's hf backend, the
        beginning-of-text token where the vocabulary has one, else the end-of-text one."""
        if self._prefix is not None:
            return int(self._prefix)
        bos = next((i for name in _BOS_NAMES if isinstance(self.tok, HFTokenizer)
                    and (i := self.tok.impl.token_to_id(name)) is not None), None)
        token = bos if bos is not None else self.tok.eos_id
        if token is None:
            raise UserError("the tokenizer has neither a beginning- nor an end-of-text token to "
                            "condition an empty context on; pass prefix_token_id=N in --model_args")
        return token

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if self.add_bos_token and add_special_tokens is not False:
            return list(self.tok.impl.encode(string, add_special_tokens=True).ids)
        return [int(i) for i in self.tok.encode(string)]

    def tok_decode(self, tokens) -> str:
        return self.tok.decode(tokens)

    # -- scoring ---------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """(log-likelihood, greedy) of each (key, context tokens, continuation tokens): the
        joined tokens left-truncated to max_length + 1, the continuation's scored."""
        rows = []
        for _, context, continuation in requests:
            if not 0 < len(continuation) <= self.max_length:
                raise UserError(f"a continuation of {len(continuation)} tokens cannot be scored "
                                f"within max_length={self.max_length}")
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            rows.append((whole, len(continuation)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list = [None] * len(rows)
        pending = None  # read one batch late, so the device works while the host fills the next
        bar = tqdm(total=len(rows), disable=disable_tqdm, desc="pjit_llm loglikelihood")
        for start in range(0, len(order), self.rows):
            batch = order[start:start + self.rows]
            L = self._padded_length(max(len(rows[i][0]) - 1 for i in batch), self.max_length)
            tokens, targets = np.zeros((2, self.rows, L), np.int32)
            weights = np.zeros((self.rows, L), bool)
            for r, i in enumerate(batch):
                whole, scored = rows[i]
                n = len(whole) - 1
                tokens[r, :n], targets[r, :n] = whole[:-1], whole[1:]
                weights[r, n - scored:n] = True
            out = self._score(self.params, *(jax.device_put(a, self._token_sharding)
                                              for a in (tokens, targets, weights)))
            if pending is not None:
                self._collect(*pending, results, requests, bar)
            pending = (batch, out)
        if pending is not None:
            self._collect(*pending, results, requests, bar)
        bar.close()
        return results

    def _collect(self, batch, out, results, requests, bar):
        logprob, greedy = (np.asarray(a) for a in out)
        for r, i in enumerate(batch):
            results[i] = (float(logprob[r]), bool(greedy[r]))
            if requests[i][0] is not None:  # rolling windows are cached per document instead
                self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        bar.update(len(batch))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's whole log-likelihood, in windows of max_length tokens that each
        predict new tokens only (lm-eval's own windowing), the first after the prefix token."""
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    self.tok_encode(string), self.prefix_token_id, self.max_length, 1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, with do_sample, sampled) continuations, cut at the first stop string;
        requests with the same generation settings share batches."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        eos = self.tok.decode([self.eot_token_id]) if self.eot_token_id is not None else None
        results: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="pjit_llm generate_until")
        for members in groups.values():
            kwargs = normalize_gen_kwargs(requests[members[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = int(kwargs.pop("max_gen_toks"))
            if not 0 < max_new < self.max_length:
                raise UserError(f"max_gen_toks={max_new} must be between 1 and max_length="
                                f"{self.max_length} - 1")
            sampling = Sampling(float(kwargs.get("temperature") or 0.0)
                                if kwargs.get("do_sample") else 0.0,
                                int(kwargs.get("top_k") or 0), float(kwargs.get("top_p") or 1.0),
                                int(kwargs.get("seed") or 0))
            if sampling not in self._generators:
                self._generators[sampling] = Generator(self.parts.model, self.parts.layout,
                                                       sampling)
            if self._decode_params is None:  # the layers as the decode loop reads them, once
                self._decode_params = Generator.prepare(self.params)
            generator = self._generators[sampling]
            limit = self.max_length - max_new  # the context's room, left-truncated as hf does
            prompts = {i: (self.tok_encode(requests[i].args[0]) or [self.prefix_token_id])[-limit:]
                       for i in members}
            members = sorted(members, key=lambda i: -len(prompts[i]))
            for start in range(0, len(members), self.rows):
                batch = members[start:start + self.rows]
                T = self._padded_length(len(prompts[batch[0]]), limit)
                out = generator.generate(self._decode_params,
                                         [np.asarray(prompts[i], np.int32) for i in batch],
                                         max_new, self.eot_token_id, pad_to=(self.rows, T))
                for i, tokens in zip(batch, out):
                    text = postprocess_generated_text(self.tok.decode(tokens), until, None)
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return results

    @staticmethod
    def _padded_length(n: int, limit: int) -> int:
        """The next power of two from MIN_LENGTH up, within `limit` (at least n)."""
        return max(n, min(limit, max(MIN_LENGTH, 1 << max(n - 1, 0).bit_length())))


def _rows(batch_size, max_batch_size, shards: int) -> int:
    """Rows per batch: lm-eval's --batch_size (`auto` takes --max_batch_size, default 64),
    rounded up to split over the mesh's batch axes."""
    text = str(batch_size)
    if text.startswith("auto"):
        rows = int(max_batch_size or 64)
    elif text.isdigit() and int(text) > 0:
        rows = int(text)
    else:
        raise UserError(f"--batch_size {batch_size} is not a positive number or auto")
    return -(-rows // shards) * shards
