"""Reading local files into records: globs and directories, text cut at line ends, JSONL by
field, bad records counted, the validation share."""

import collections
import json

import pytest

from pjit_llm.data.records import RECORD_BYTES, expand_paths, is_validation, read_records
from pjit_llm.errors import UserError


def test_text_files_are_cut_at_line_ends_and_bad_records_counted(tmp_path):
    big = "".join(f"line {i} ü\n" for i in range(4000))  # several records' worth
    (tmp_path / "a.txt").write_text(big)
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\xfe not utf-8\n")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_bytes(b'{"text": "one"}\nnot json\n{"body": "no field"}\n{"text": 3}\n'
                      b'\n{"text": "\xff"}\n{"text": "two"}\n')
    skipped = collections.Counter()
    records = list(read_records(expand_paths((str(tmp_path),)), "text", skipped))
    texts = dict(records)
    a = [t for k, t in records if "a.txt" in k]
    assert "".join(a) == big and all(len(t.encode()) <= RECORD_BYTES and t.endswith("\n") for t in a)
    assert len(a) > 2
    assert [t for k, t in records if "b.jsonl" in k] == ["one", "two"]
    assert skipped == {"not UTF-8": 2, "not JSON": 1, "no text field 'text'": 2}
    assert len(texts) == len(records)  # keys are unique


def test_chat_records_are_checked_and_other_files_refused(tmp_path):
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    (tmp_path / "c.jsonl").write_text(json.dumps(chat) + "\n" + json.dumps({"messages": []})
                                      + "\nnot json\n" + json.dumps({"prompt": "a"}) + "\n")
    skipped = collections.Counter()
    records = list(read_records(expand_paths((str(tmp_path / "c.jsonl"),)), "text", skipped, "chat"))
    assert [json.loads(t) for _, t in records] == [chat]
    assert skipped == {"no messages list": 2, "not JSON": 1}
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="data.format=chat reads JSON Lines files, but .*notes.txt"):
        list(read_records(expand_paths((str(tmp_path),)), "text", skipped, "chat"))


def test_validation_share_is_spread_and_never_empty():
    assert [i for i in range(60) if is_validation(i, 0.05)] == [0, 20, 40]
    assert [i for i in range(10) if is_validation(i, 0.25)] == [0, 4, 8]
    assert sum(is_validation(i, 0.3) for i in range(1000)) == 300
    assert is_validation(0, 0.01) and not is_validation(1, 0.5)


def test_paths_globs_and_directories(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/x.txt", "d/sub/y.txt", "d/.hidden", "z.md"):
        (tmp_path / name).write_text("hi")
    keys = [k for k, _ in expand_paths((str(tmp_path / "d"), str(tmp_path / "*.md")))]
    assert [k.removeprefix(str(tmp_path) + "/") for k in keys] == ["d/sub/y.txt", "d/x.txt", "z.md"]
    with pytest.raises(UserError, match="nothing found at"):
        expand_paths((str(tmp_path / "missing.txt"),))
    with pytest.raises(UserError, match="nothing found at"):
        expand_paths((str(tmp_path / "*.json"),))

