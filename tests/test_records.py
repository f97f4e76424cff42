"""Reading local files into records: globs and directories, text cut at line ends, JSONL by
field, bad records located and said what is wrong, bytes that are not UTF-8 replaced, binary
files skipped, the validation share."""

import json
from pathlib import Path

import pytest

from pjit_llm.data.records import (RECORD_BYTES, ReadReport, expand_paths, is_validation,
                                   read_records)
from pjit_llm.errors import UserError


def read(paths, fmt="text", shown=ReadReport.SHOWN) -> tuple[list[tuple[str, str]], ReadReport]:
    report = ReadReport(shown)
    return list(read_records(expand_paths(tuple(map(str, paths))), "text", report, fmt)), report


def test_text_files_are_cut_at_line_ends(tmp_path):
    big = "".join(f"line {i} ü\n" for i in range(4000))  # several records' worth
    (tmp_path / "a.txt").write_text(big)
    records, report = read([tmp_path / "a.txt"])
    assert "".join(t for _, t in records) == big and len(records) > 2
    assert all(len(t.encode()) <= RECORD_BYTES and t.endswith("\n") for _, t in records)
    assert len(dict(records)) == len(records)  # keys are unique
    assert report.describe() == ""


def test_bad_jsonl_lines_are_located_and_said_what_is_wrong(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("data").mkdir()
    Path("data/train.jsonl").write_bytes(
        b'{"text": "one"}\n{"text": "two",\n{"text": 3}\n\n{"body": "x"}\n{"text": null}\n'
        b'{"text": [1]}\n["a", "list"]\n{"text": "\xff"}\n{"text": 2.5}\n{"text": "three"}\n')
    records, report = read(["data/train.jsonl"], shown=10)
    assert [t for _, t in records] == ["one", "three"]
    assert report.describe() == (
        "skipped 8 bad records in data/train.jsonl: line 2 is not JSON (Expecting property name "
        "enclosed in double quotes at column 16); line 3: field 'text' is an int; line 5: field "
        "'text' is missing; line 6: field 'text' is null; line 7: field 'text' is a list; line 8 "
        "is not a JSON object (it is a list); line 9 is not UTF-8 (byte 0xff at column 11); line 10: "
        "field 'text' is a float")
    _, report = read(["data/train.jsonl"])  # the first few, and the rest counted by kind
    assert report.describe() == (
        "skipped 8 bad records in data/train.jsonl: line 2 is not JSON (Expecting property name "
        "enclosed in double quotes at column 16); line 3: field 'text' is an int; line 5: field "
        "'text' is missing (first 3 of 8 shown; 4 field 'text' not a string, 1 not JSON, "
        "1 field 'text' missing, 1 not a JSON object, 1 not UTF-8)")


def test_bad_records_in_several_files_name_each_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("a.jsonl").write_text('{"text": "ok"}\nnot json\n')
    Path("b.jsonl").write_text('{"text": {"nested": 1}}\n{"text": true}\n')
    _, report = read(["a.jsonl", "b.jsonl"])
    assert report.describe() == (
        "skipped 3 bad records in 2 files: a.jsonl line 2 is not JSON (Expecting value at "
        "column 1); b.jsonl line 1: field 'text' is an object; b.jsonl line 2: field 'text' is "
        "a boolean")


def test_a_bad_byte_in_a_text_file_is_replaced_and_no_other_text_lost(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = [f"line {i:03d} of a text file with some words in it, ü\n" for i in range(330)]
    data = "".join(lines).encode()
    bad = data.index(b"line 039")  # line 40
    Path("x.txt").write_bytes(data[:bad] + b"\xff" + data[bad:])
    assert RECORD_BYTES < len(data) + 1 < 2 * RECORD_BYTES  # about 17 KB: two records
    records, report = read(["x.txt"])
    assert "".join(t for _, t in records) == "".join(lines[:39]) + "\ufffd" + "".join(lines[39:])
    assert report.describe() == "replaced 1 byte that is not UTF-8 with U+FFFD in x.txt (at line 40)"
    # A truncated character, and text that holds U+FFFD itself, are counted right.
    Path("y.txt").write_bytes(b"ok \xef\xbf\xbd\nsecond \xe2\x82 and \xc3\n")
    records, report = read(["y.txt"])
    assert [t for _, t in records] == ["ok \ufffd\nsecond \ufffd and \ufffd\n"]
    assert report.describe() == ("replaced 3 bytes that are not UTF-8 with U+FFFD in y.txt "
                                 "(the first at line 2)")


def test_a_binary_file_is_skipped_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("notes.txt").write_text("some text\n")
    Path("blob.bin").write_bytes(bytes(range(256)) * 64)
    records, report = read(["notes.txt", "blob.bin"])
    assert [t for _, t in records] == ["some text\n"]
    assert report.describe() == ("skipped 1 file that is binary, not text: blob.bin (a NUL byte "
                                 "at offset 0)")


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

