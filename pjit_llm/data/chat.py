"""Conversations and prompt/completion pairs: records, the model's chat template, and which
tokens carry the loss.

`data.format=chat` reads JSONL records with a `messages` list ({"role", "content"}),
rendered with the chat template that ships with the model's tokenizer (`chat_template.jinja`
or the `chat_template` of `tokenizer_config.json` beside `tokenizer.json`, as transformers
reads them), and takes the loss on the assistant turns only. `data.format=prompt_completion`
reads `prompt` and `completion` fields and takes the loss on the completion (and the end
token) only. Each record becomes `tokens`, a per-token `loss_mask` (1: the token is a target
the loss counts) and `truncated` (1 on the first token of a record cut at data.seq_len), all
packed alongside each other so the mask follows its tokens into the batch.

Records are checked when the dataset is prepared (bad ones skipped and counted) and stored as
canonical JSON text; rendering and tokenizing happen in the Grain workers.
"""

import json
from datetime import datetime
from pathlib import Path

import numpy as np

from pjit_llm.data.tokenizer import HFTokenizer
from pjit_llm.errors import UserError

TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"
# The named special tokens transformers passes to every template (its special_tokens_map).
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")


# ---------------------------------------------------------------- records (at preparation)

def to_record(obj, fmt: str) -> tuple[str | None, str | None]:
    """(the record as canonical JSON text, None) for a good JSONL object of format `fmt`, or
    (None, the reason it is skipped)."""
    if not isinstance(obj, dict):
        return None, "not a JSON object"
    if fmt == "prompt_completion":
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            return None, "no string prompt and completion"
        if not completion:
            return None, "empty completion"
        return json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False), None
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        return None, "no messages list"
    kept = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            return None, "a message without string role and content"
        # As transformers does: a key whose value is null is absent for the template.
        kept.append({k: v for k, v in m.items() if v is not None})
    if not any(m["role"] == "assistant" and m["content"] for m in kept):
        return None, "no assistant message"
    return json.dumps({"messages": kept}, ensure_ascii=False), None


# ---------------------------------------------------------------- the chat template

def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    """A model's chat template and its special tokens, rendered the way transformers'
    `apply_chat_template` renders (our own code): a sandboxed Jinja environment with
    trim_blocks and lstrip_blocks, loop controls, `raise_exception`, a `tojson` that does not
    escape HTML, `strftime_now`, the named special tokens as variables, and
    `add_generation_prompt`. Picklable: the template compiles on first use in each process."""

    def __init__(self, source: str, special_tokens: dict[str, str], origin: str):
        self.source, self.special_tokens, self.origin = source, special_tokens, origin
        self._compiled = None

    def __getstate__(self):
        return {"source": self.source, "special_tokens": self.special_tokens, "origin": self.origin}

    def __setstate__(self, state):
        self.__dict__.update(state, _compiled=None)

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    def _template(self):
        if self._compiled is None:
            self._compiled = _compile(self.source, self.origin)
        return self._compiled

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        import jinja2
        try:
            return self._template().render(messages=messages, tools=None, documents=None,
                                           add_generation_prompt=add_generation_prompt,
                                           **self.special_tokens)
        except jinja2.TemplateError as e:
            raise UserError(f"the chat template of {self.origin} failed on a conversation: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; fix the "
                            "record or the template") from None

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """(the rendered conversation, the character spans of its assistant turns).

        Found by prefix renders rather than markers: the conversation up to an assistant
        message, rendered with the generation prompt, ends where the reply starts, and the
        conversation through that message ends where the turn ends (its end-of-turn token
        included, so the model learns to stop). Markers inserted into the content would be
        seen by the template, which may trim, split or escape content and so move or lose
        them; prefix renders use the template exactly as it is, and any template whose
        renders are not prefixes of each other (one that rewrites earlier turns) is refused.
        """
        text = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = self.render(messages[:i], add_generation_prompt=True)
            end = self.render(messages[: i + 1])
            if not (text.startswith(end) and end.startswith(start)):
                raise UserError(f"the chat template of {self.origin} renders a conversation's "
                                "earlier turns differently once later turns follow, so the "
                                "assistant tokens cannot be found; use a template that renders "
                                "conversations incrementally")
            spans.append((len(start), len(end)))
        return text, spans


def _compile(source: str, origin: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant marker) renders
        its body; we find assistant turns by prefix renders instead."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"the chat template of {origin} is not valid Jinja (line {e.lineno}: "
                        f"{e.message}); fix the template") from None


def load_chat_template(tokenizer_path: str) -> ChatTemplate:
    """The chat template beside a tokenizer.json: `chat_template.jinja` if present (it wins, as
    in transformers), else tokenizer_config.json's `chat_template` (a string, or a list of
    named templates of which `default` is used)."""
    directory = Path(tokenizer_path).parent
    config_file = directory / CONFIG_FILE
    config = {}
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise UserError(f"{config_file} is not readable JSON; fix or remove it") from None
    template_file = directory / TEMPLATE_FILE
    source, origin = config.get("chat_template"), str(config_file)
    if template_file.is_file():
        source, origin = template_file.read_text(encoding="utf-8"), str(template_file)
    elif isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if not isinstance(source, str) or not source.strip():
        raise UserError(f"the tokenizer in {directory} has no chat template (no {TEMPLATE_FILE} "
                        f"and no chat_template in {CONFIG_FILE}); add one, or use "
                        "data.format=prompt_completion or text")
    special = {name: text for name in SPECIAL_TOKENS
               if (text := _token_text(config.get(name))) is not None}
    return ChatTemplate(source, special, origin)


# ---------------------------------------------------------------- tokens and loss mask

class Encode:
    """A prepared record -> {"tokens", "loss_mask", "truncated"}, each int32 of one length
    (at most `max_len`). A picklable callable for Grain's map, run in its workers."""

    def __init__(self, tokenizer, fmt: str, max_len: int, template: ChatTemplate | None):
        self.tokenizer, self.fmt, self.max_len, self.template = tokenizer, fmt, max_len, template

    def __call__(self, record) -> dict:
        raw = record["text"]
        obj = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
        if self.fmt == "chat":
            ids, mask = chat_tokens(self.tokenizer, self.template, obj["messages"])
        else:
            ids, mask = completion_tokens(self.tokenizer, obj["prompt"], obj["completion"])
        truncated = np.zeros(min(len(ids), self.max_len), np.int32)
        if len(ids) > self.max_len:
            truncated[0] = 1
        return {"tokens": ids[: self.max_len], "loss_mask": mask[: self.max_len],
                "truncated": truncated}


def chat_tokens(tokenizer, template: ChatTemplate, messages: list[dict]):
    """(token ids, loss mask) of a rendered conversation: a token is a target when any of its
    characters lies in an assistant turn (the tokenizer's offsets map characters to tokens).
    The template places the special tokens (beginning of text, end of turn) itself."""
    text, spans = template.assistant_spans(messages)
    ids, offsets = tokenizer.encode_with_offsets(text)
    starts, ends = offsets[:, 0], offsets[:, 1]
    mask = np.zeros(len(ids), bool)
    for a, b in spans:
        mask |= (ends > a) & (starts < b)
    return ids, mask.astype(np.int32)


def completion_tokens(tokenizer, prompt: str, completion: str):
    """(prompt ids + completion ids + end token, loss mask on the completion and end token).
    The two parts are tokenized apart so that no token straddles the boundary."""
    head, tail = tokenizer.encode(prompt), tokenizer.encode(completion)
    if tokenizer.eos_id is not None:
        tail = np.append(tail, np.int32(tokenizer.eos_id))
    ids = np.concatenate([head, tail]).astype(np.int32)
    mask = np.concatenate([np.zeros(len(head), np.int32), np.ones(len(tail), np.int32)])
    return ids, mask


def encoder(tokenizer, fmt: str, max_len: int) -> Encode:
    """The Grain map for a non-text format; loads (and checks) the chat template here, in the
    main process, so a missing one is reported before any worker starts."""
    template = None
    if fmt == "chat":
        if not isinstance(tokenizer, HFTokenizer):
            raise UserError("data.format=chat needs data.tokenizer=hf: the chat template comes "
                            "with the model's tokenizer.json")
        template = load_chat_template(tokenizer.path)
        template._template()  # a syntax error is reported now, not in a worker
    return Encode(tokenizer, fmt, max_len, template)


def chat_prompt(template: ChatTemplate, prompt: str) -> str:
    """A user's prompt as the start of a conversation, ready for the assistant's reply."""
    return template.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
