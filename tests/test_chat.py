"""Chat and prompt/completion records: the template renders as transformers renders it, the
loss mask covers the assistant turns (and completions) only, records are checked and
truncation is flagged; missing or unusable templates are refused in one line."""

import json

import numpy as np
import pytest

from hf_models import chat_tokenizer
from pjit_llm.data.chat import (Encode, chat_prompt, chat_tokens, completion_tokens,
                                load_chat_template, to_record)
from pjit_llm.data.tokenizer import HFTokenizer
from pjit_llm.errors import UserError

CONVERSATION = [{"role": "user", "content": "the cat sat"},
                {"role": "assistant", "content": "on a mat"},
                {"role": "user", "content": "a dog ran"},
                {"role": "assistant", "content": "to the big red cat"}]


@pytest.fixture
def tok(tmp_path):
    return HFTokenizer(str(chat_tokenizer(tmp_path / "tok")))


def words(tokenizer, ids):
    return [tokenizer.impl.id_to_token(int(i)) for i in ids]


def test_the_mask_covers_each_reply_and_its_end_token_only(tok):
    template = load_chat_template(tok.path)
    ids, mask = chat_tokens(tok, template, CONVERSATION)
    assert words(tok, ids) == ["<s>", "<|user|>", "the", "cat", "sat", "<|assistant|>", "on", "a",
                               "mat", "</s>", "<|user|>", "a", "dog", "ran", "<|assistant|>",
                               "to", "the", "big", "red", "cat", "</s>"]
    assert words(tok, ids[mask == 1]) == ["on", "a", "mat", "</s>", "to", "the", "big", "red",
                                          "cat", "</s>"]


def test_rendering_and_mask_match_transformers(tok):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(str(tok.path).rsplit("/", 1)[0])
    template = load_chat_template(tok.path)
    out = theirs.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
    ids, mask = chat_tokens(tok, template, CONVERSATION)
    assert template.render(CONVERSATION) == theirs.apply_chat_template(CONVERSATION, tokenize=False)
    assert ids.tolist() == list(out["input_ids"])
    assert mask.tolist() == list(out["assistant_masks"])
    prompt = [{"role": "user", "content": "the cat"}]
    assert chat_prompt(template, "the cat") == theirs.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=True)


def test_a_tokenizer_without_a_template_is_refused_in_one_line(tmp_path):
    path = chat_tokenizer(tmp_path / "tok", template=None)
    with pytest.raises(UserError, match=r"has no chat template \(no chat_template.jinja and no "
                                        r"chat_template in tokenizer_config.json\); add one"):
        load_chat_template(str(path))


def test_the_jinja_file_wins_and_a_list_of_templates_gives_the_default(tmp_path):
    path = chat_tokenizer(tmp_path / "tok", template=[{"name": "tool_use", "template": "T"},
                                                      {"name": "default", "template": "D"}])
    assert load_chat_template(str(path)).render([]) == "D"
    (tmp_path / "tok/chat_template.jinja").write_text("{{ eos_token }}J")
    assert load_chat_template(str(path)).render([]) == "</s>J"


def test_template_errors_and_rewriting_templates_are_refused(tok, tmp_path):
    template = load_chat_template(tok.path)
    with pytest.raises(UserError, match="failed on a conversation: roles must be user or "
                                        "assistant, not tool; fix the record"):
        chat_tokens(tok, template, [{"role": "tool", "content": "x"}] + CONVERSATION)
    # A template that renders the last turn apart from the others: prefixes do not line up.
    path = chat_tokenizer(tmp_path / "other", template=(
        "{% for m in messages %}{% if loop.last %}[{% endif %}{{ m['content'] }} {% endfor %}"))
    with pytest.raises(UserError, match="renders a conversation's earlier turns differently"):
        chat_tokens(tok, load_chat_template(str(path)), CONVERSATION)


def test_records_are_checked_and_stored_as_json():
    text, reason = to_record({"messages": CONVERSATION, "id": 7}, "chat")
    assert reason is None and json.loads(text) == {"messages": CONVERSATION}
    assert to_record({"messages": [{"role": "user", "content": "hi"}]}, "chat")[1] == \
        "no assistant message"
    assert to_record({"messages": [{"role": "user"}]}, "chat")[1] == \
        "a message without string role and content"
    assert to_record({"text": "x"}, "chat")[1] == "no messages list"
    assert to_record({"prompt": "a", "completion": ""}, "prompt_completion")[1] == "empty completion"
    text, reason = to_record({"prompt": "a", "completion": "b", "x": 1}, "prompt_completion")
    assert reason is None and json.loads(text) == {"prompt": "a", "completion": "b"}


def test_prompt_completion_masks_the_prompt(tok):
    ids, mask = completion_tokens(tok, "the cat sat", "on a mat")
    assert words(tok, ids) == ["the", "cat", "sat", "on", "a", "mat", "</s>"]
    assert mask.tolist() == [0, 0, 0, 1, 1, 1, 1]


def test_a_record_longer_than_a_row_is_cut_and_flagged(tok):
    record = {"text": to_record({"messages": CONVERSATION}, "chat")[0].encode()}
    template = load_chat_template(tok.path)
    whole = Encode(tok, "chat", 64, template)(record)
    cut = Encode(tok, "chat", 8, template)(record)
    assert len(whole["tokens"]) == 21 and whole["truncated"].sum() == 0
    np.testing.assert_array_equal(cut["tokens"], whole["tokens"][:8])
    np.testing.assert_array_equal(cut["loss_mask"], whole["loss_mask"][:8])
    assert cut["truncated"].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]


# In the manner of Qwen3's template: the reply after the last user turn opens with a thinking
# block (empty here), earlier replies are rendered without one.
THINKING = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{% if m['role'] == 'user' %}{% set ns.last_user = loop.index0 %}"
    "{% endif %}{% endfor %}"
    "{%- for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} "
    "{% elif loop.index0 > ns.last_user %}<|assistant|> <think> </think> {{ m['content'] }} "
    "{{ eos_token }} {% else %}<|assistant|> {{ m['content'] }} {{ eos_token }} {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")


def test_a_thinking_template_trains_on_its_final_reply_and_refuses_rewritten_turns(tok, tmp_path):
    """Qwen3's template adds a thinking block to the reply that ends a conversation: a
    prompt and its reply train on the block and the reply; a conversation whose earlier replies
    the template renders differently once later turns follow is refused (transformers cannot
    mask those either: the template has no generation markers)."""
    template = load_chat_template(str(chat_tokenizer(tmp_path / "qwen", template=THINKING)))
    ids, mask = chat_tokens(tok, template, CONVERSATION[:2])
    assert words(tok, ids[mask == 1]) == ["[UNK]", "[UNK]", "[UNK]", "[UNK]", "[UNK]", "[UNK]",
                                          "on", "a", "mat", "</s>"]  # <think> </think>: unknown here
    assert chat_prompt(template, "the cat").endswith("<|assistant|> ")
    with pytest.raises(UserError, match="renders a conversation's earlier turns differently"):
        chat_tokens(tok, template, CONVERSATION)
