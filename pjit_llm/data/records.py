"""Text records from local files: whole text files (in chunks) and JSON Lines.

Bad records inside an otherwise good corpus (a line that is not JSON, lacks the text field,
or bytes that are not UTF-8) are skipped and counted, never fatal.
"""

import collections
import fractions
import glob
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

from pjit_llm.data.chat import to_record
from pjit_llm.errors import UserError

# Text files are cut into records of at most this many bytes, at line ends, so that one big
# file still gives a validation share and the work spreads over Grain's workers.
RECORD_BYTES = 16 * 1024
JSONL_SUFFIXES = (".jsonl", ".jsonl.txt", ".ndjson")


def expand_paths(patterns: tuple[str, ...]) -> list[tuple[str, Path]]:
    """Files named by paths, globs and directories: (key, path), sorted, no duplicates."""
    found: dict[str, Path] = {}
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches or not os.path.exists(matches[0]):
            raise UserError(f"data.paths: nothing found at {pattern!r}; give existing files, "
                            "globs or directories")
        for match in matches:
            path = Path(match)
            inside = sorted(p for p in path.rglob("*") if p.is_file() and
                            not any(part.startswith(".") for part in p.relative_to(path).parts)
                            ) if path.is_dir() else [path]
            for p in inside:
                found.setdefault(p.as_posix(), p)
    if not found:
        raise UserError(f"data.paths {list(patterns)} name no files")
    return sorted(found.items())


def is_validation(index: int, fraction: float) -> bool:
    """Every (1/fraction)-th record from the first on: evenly spread, the same every time,
    and never empty, however few records there are."""
    f = fractions.Fraction(repr(fraction))  # exact: 20 * 0.05 must be 1, not 1.0000000000000002
    return math.floor(index * f + 1 - f) < math.floor((index + 1) * f + 1 - f)


def read_records(files: list[tuple[str, Path]], text_field: str,
                 skipped: collections.Counter, fmt: str = "text") -> Iterator[tuple[str, str]]:
    """(key, text) for every good record; reasons for bad ones are counted in `skipped`.
    Formats other than text read JSONL only and give each record as canonical JSON (chat.py)."""
    for name, path in files:
        if fmt != "text" and not path.name.endswith(JSONL_SUFFIXES):
            raise UserError(f"data.format={fmt} reads JSON Lines files, but {path} is not one "
                            f"(name it {' or '.join(JSONL_SUFFIXES)})")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror}") from None
        if path.name.endswith(JSONL_SUFFIXES):
            yield from _jsonl(name, data, text_field, skipped, fmt)
        else:
            for i, chunk in enumerate(_chunks(data)):
                try:
                    yield f"{name}#{i}", chunk.decode("utf-8")
                except UnicodeDecodeError:
                    skipped["not UTF-8"] += 1


def _jsonl(name: str, data: bytes, field: str, skipped, fmt: str = "text") -> Iterator[tuple[str, str]]:
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            skipped["not UTF-8"] += 1
            continue
        except json.JSONDecodeError:
            skipped["not JSON"] += 1
            continue
        if fmt != "text":
            text, reason = to_record(obj, fmt)
            if reason:
                skipped[reason] += 1
            else:
                yield f"{name}:{lineno}", text
            continue
        text = obj.get(field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            skipped[f"no text field {field!r}"] += 1
            continue
        if text:
            yield f"{name}:{lineno}", text


def _chunks(data: bytes) -> Iterator[bytes]:
    start = 0
    while start < len(data):
        end = min(start + RECORD_BYTES, len(data))
        if end < len(data):
            cut = data.rfind(b"\n", start, end)
            if cut > start:
                end = cut + 1
            else:  # no line end: do not split a UTF-8 character
                while end > start + 1 and data[end] & 0xC0 == 0x80:
                    end -= 1
        if data[start:end].strip():
            yield data[start:end]
        start = end


def describe_skipped(skipped: collections.Counter) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())
