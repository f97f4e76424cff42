"""Chat fine-tuning through the commands: a small Llama made by transformers with a chat
template is imported, fine-tuned on a chat JSONL (loss on the assistant's tokens only,
checked against a computation by hand with transformers), exported, loaded back in
transformers, and answers `generate --chat` as transformers answers the same prompt."""

import json

import numpy as np
import pytest

from conftest import run_module
from hf_models import chat_tokenizer, hf_llama

pytestmark = pytest.mark.slow

CONVERSATION = [{"role": "user", "content": "the cat sat"},
                {"role": "assistant", "content": "on a mat"},
                {"role": "user", "content": "a dog ran"},
                {"role": "assistant", "content": "to the big red cat"}]


def assistant_loss(model, tokenizer, conversation) -> float:
    """transformers' mean next-token loss over the tokens its own assistant mask marks."""
    import torch
    out = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = np.asarray(out["input_ids"]), np.asarray(out["assistant_masks"])
    with torch.no_grad():
        logits = model(torch.tensor(ids[None])).logits[0].double()
    logp = torch.log_softmax(logits, -1).numpy()
    nll = -logp[np.arange(len(ids) - 1), ids[1:]]
    return float(nll[mask[1:] == 1].mean())


def test_chat_fine_tuning_end_to_end(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = hf_llama(tmp_path / "hf", vocab_size=320)
    chat_tokenizer(tmp_path / "hf")  # the word-level vocabulary plus chat tokens and template
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    # Every record is the same conversation, so the mean loss of any batch is that of one.
    (tmp_path / "chat.jsonl").write_text(
        "".join(json.dumps({"messages": CONVERSATION}) + "\n" for _ in range(40)))
    expected = assistant_loss(model, tokenizer, CONVERSATION)
    everything = assistant_loss(model, tokenizer, [dict(m, role="assistant") for m in CONVERSATION])

    imported = run_module("pjit_llm.convert", "import", "--hf", "hf", "--out", "base", cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    trained = run_module(
        "pjit_llm.train", "--emulate-devices", "2", "--config", "base/config.yaml",
        "train.init_from=base", "train.run_dir=ft", "data.source=local", "data.paths=[chat.jsonl]",
        "data.format=chat", "data.seq_len=32", "data.batch_size=8", "data.num_workers=1",
        "train.steps=3", "train.log_every=1", "train.eval_every=3", "train.eval_batches=1",
        "train.sample_prompts=[]", "optimizer.lr=3e-3", "optimizer.warmup_steps=0",
        cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    lines = [json.loads(line) for line in (tmp_path / "ft/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    evals = [r for r in lines if "eval_loss" in r]
    # Step 1's loss (the imported weights) and the evaluation before it are transformers'
    # loss over the assistant's tokens alone, not over every token.
    assert steps[0]["loss"] == pytest.approx(expected, rel=1e-4)
    assert evals[0]["eval_loss"] == pytest.approx(expected, rel=1e-4)
    assert abs(expected - everything) > 0.05
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert steps[-1]["records"] == 3 * 8 and steps[-1]["truncated_records"] == 0

    exported = run_module("pjit_llm.convert", "export", "--run", "ft", "--out", "ft-hf", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    tuned = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "ft-hf")).eval()
    tuned_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "ft-hf"))
    assert tuned_tokenizer.chat_template == tokenizer.chat_template

    generated = run_module("pjit_llm.generate", "--run", "ft", "--chat", "--prompt", "the cat sat",
                           "--max-new-tokens", "6", cwd=tmp_path)
    assert generated.returncode == 0, generated.stderr
    import torch
    prompt = tuned_tokenizer.apply_chat_template([{"role": "user", "content": "the cat sat"}],
                                                 add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)["input_ids"]
    assert tuned_tokenizer.convert_ids_to_tokens(prompt[0].tolist())[-1] == "<|assistant|>"
    with torch.no_grad():
        out = tuned.generate(prompt, max_new_tokens=6, do_sample=False,
                             eos_token_id=tuned_tokenizer.eos_token_id, pad_token_id=0)
    reply = tuned_tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)
    print(f"assistant-token loss {expected:.6f} (all tokens {everything:.6f}); step 1 "
          f"{steps[0]['loss']:.6f}, eval {evals[0]['eval_loss']:.6f}; step 3 {steps[-1]['loss']:.6f}; "
          f"reply {reply!r}")
    assert reply.split() and generated.stdout.strip().splitlines()[-1].split() == reply.split()
