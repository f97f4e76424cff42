"""`python -m pjit_llm.lm_eval` on tasks defined here on local data (multiple choice, rolling
log-likelihood, generation), against lm-eval's own `hf` backend on the same model exported to
Hugging Face: equal accuracies and generations, log-likelihoods within TOLERANCE.

Needs the `lm-eval` and `hf` extras (transformers, torch, accelerate for lm-eval's backend)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import SESSION_DIR, run_module

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")
pytest.importorskip("transformers")

# Both sides compute in float32; the largest difference measured is 2.3e-5, on a document total.
TOLERANCE = 1e-4
MAX_LENGTH = 32  # short, so that the documents are scored in several rolling windows
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(SESSION_DIR / "hf_datasets")}
TASKS = "pjit_mc,pjit_ppl,pjit_gen"


def _task_files(directory: Path, greedy_words: list[str]) -> None:
    """Multiple-choice items (the model's greedy next word among the choices), documents
    longer than MAX_LENGTH tokens, and generation prompts, with one task YAML for each."""
    from hf_models import WORDS
    rng = np.random.default_rng(1)
    vocabulary = WORDS[1:40]
    with open(directory / "items.jsonl", "w") as f:
        for i, greedy in enumerate(greedy_words):
            others = [" ".join(rng.choice(vocabulary, size=1 + k % 3)) for k in range(3)]
            choices = others[:i % 4] + [greedy] + others[i % 4:]
            f.write(json.dumps({"question": QUESTIONS[i], "choices": choices, "answer": i % 4,
                                "text": " ".join(rng.choice(vocabulary, size=45))}) + "\n")
    data = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
            f"{directory / 'items.jsonl'}\ntest_split: test\n")
    (directory / "mc.yaml").write_text(
        "task: pjit_mc\n" + data + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: answer\ndoc_to_choice: choices\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (directory / "ppl.yaml").write_text(
        "task: pjit_ppl\n" + data + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n")
    (directory / "gen.yaml").write_text(
        "task: pjit_gen\n" + data + "output_type: generate_until\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: '{{choices[answer]}}'\ngeneration_kwargs:\n  until: ['w119']\n"
        "  max_gen_toks: 6\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n")


QUESTIONS = ["the cat sat on", "a dog ran to", "it was a big", "def", "the red dog is in",
             "return a mat and", "of the big"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(imported run, its Hugging Face export, the task directory) of a small random Llama
    whose tokenizer.json has an end-of-text token both sides know."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    from hf_models import WORDS, hf_llama, hf_logits
    from pjit_llm.interop import hf as convert
    where = tmp_path_factory.mktemp("lm_eval")
    hf = where / "hf"
    torch_model = hf_llama(hf)
    words = WORDS[:-1] + ["</s>"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken("</s>", special=True)])
    tokenizer.save(str(hf / "tokenizer.json"))
    (hf / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>"}))
    run = convert.import_hf(hf, where / "run")
    export, _ = convert.export_hf(run, where / "export", None, None, shard_bytes=10**9)
    greedy = [words[int(np.argmax(hf_logits(torch_model, [tokenizer.encode(q).ids])[0, -1]))]
              for q in QUESTIONS]
    tasks = where / "tasks"
    tasks.mkdir()
    _task_files(tasks, greedy)
    return run, export, tasks


def _hf_backend(export: Path, tasks: Path) -> dict:
    """lm-eval's own `hf` backend in this process (transformers on the CPU), batch size 1."""
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    return simple_evaluate(model="hf", model_args={"pretrained": str(export), "dtype": "float32",
                                                   "max_length": MAX_LENGTH},
                           tasks=TASKS.split(","), device="cpu", batch_size=1, log_samples=True,
                           task_manager=TaskManager(include_path=str(tasks),
                                                    include_defaults=False))


def _first(response):
    """The log-likelihood in a response: saved as [value, greedy] or [[value]], in memory as
    a tuple or a bare float."""
    while isinstance(response, (list, tuple)):
        response = response[0]
    return response


def _responses(samples: list[dict]) -> list:
    return [s["resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]


def test_lm_eval_command_matches_the_hf_backend_on_the_export(model, tmp_path):
    run, export, tasks = model
    result = run_module(
        "pjit_llm.lm_eval", "--model_args",
        f"run={run},emulate_devices=4,mesh.tensor=2,max_length={MAX_LENGTH}",
        "--tasks", TASKS, "--include_path", str(tasks), "--batch_size", "3",
        "--output_path", str(tmp_path / "out"), "--log_samples", env=OFFLINE, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ours = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    samples = {task: [json.loads(line) for line in next(
        (tmp_path / "out").rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
        for task in TASKS.split(",")}
    theirs = _hf_backend(export, tasks)

    for task, metric in [("pjit_mc", "acc,none"), ("pjit_mc", "acc_norm,none"),
                         ("pjit_gen", "exact_match,none")]:
        assert ours[task][metric] == theirs["results"][task][metric], (task, metric)
    assert ours["pjit_mc"]["acc,none"] >= 0.7  # the greedy next word is (nearly) always chosen
    assert ours["pjit_ppl"]["word_perplexity,none"] == pytest.approx(
        theirs["results"]["pjit_ppl"]["word_perplexity,none"], rel=1e-5)
    worst = 0.0
    for task in ("pjit_mc", "pjit_ppl"):
        mine, hf = _responses(samples[task]), _responses(theirs["samples"][task])
        assert len(mine) == len(hf) == len(QUESTIONS)
        for a, b in zip(mine, hf):  # per document: one response per choice (or one in all)
            a_ll, b_ll = ([float(_first(r)) for r in x] for x in (a, b))
            assert np.allclose(a_ll, b_ll, atol=TOLERANCE, rtol=0), (task, a, b)
            worst = max(worst, float(np.max(np.abs(np.subtract(a_ll, b_ll)))))
            if task == "pjit_mc":  # (log-likelihood, is greedy): the flags must agree too
                assert [str(r[0][1]) for r in a] == [str(r[0][1]) for r in b], (a, b)
    print(f"largest log-likelihood difference from the hf backend: {worst:.2e}")
    assert any(r[0][1] == "True" for s in samples["pjit_mc"] for r in s["resps"])
    assert _responses(samples["pjit_gen"]) == _responses(theirs["samples"]["pjit_gen"])
