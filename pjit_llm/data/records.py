"""Text records from local files: whole text files (in chunks) and JSON Lines.

Bad records inside an otherwise good corpus (a JSONL line that is not JSON or UTF-8, or lacks
a string text field) and binary files are skipped, never fatal; bytes of a text file that are
not UTF-8 become U+FFFD. A `ReadReport` counts them and says where the first few are.
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
BINARY_PROBE = 8000  # a NUL byte in a file's first this many bytes makes it binary (as in git)
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


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


class ReadReport:
    """What reading files met besides good records, to tell the user where: bad records
    skipped (counted by kind, the first few located by file and line), binary files skipped,
    bytes that are not UTF-8 replaced."""

    SHOWN = 3  # located problems of each sort in a report

    def __init__(self, shown: int = SHOWN):
        self.shown = shown
        self.kinds: collections.Counter = collections.Counter()  # bad records by kind
        self.located: list[tuple[str, str]] = []  # (file, what is wrong where) of the first
        self.bad_files: set[str] = set()  # files holding bad records
        self.binary: list[tuple[str, int]] = []  # (file, offset of a NUL byte)
        self.replacements: dict[str, list[int]] = {}  # file -> [bytes replaced, first line]

    def skip(self, name: str, kind: str, what: str) -> None:
        self.kinds[kind] += 1
        self.bad_files.add(name)
        if len(self.located) < self.shown:
            self.located.append((name, what))

    def skip_binary(self, name: str, nul: int) -> None:
        self.binary.append((name, nul))

    def replaced(self, name: str, n_bytes: int, line: int) -> None:
        self.replacements.setdefault(name, [0, line])[0] += n_bytes

    def __bool__(self) -> bool:
        return bool(self.kinds or self.binary or self.replacements)

    def describe(self) -> str:
        """One line: each sort of problem with its first places, "; "-separated."""
        return "; ".join(filter(None, (self._skipped(), self._binary(), self._replaced())))

    def _skipped(self) -> str:
        total = sum(self.kinds.values())
        if not total:
            return ""
        head = "skipped " + _plural(total, "bad record", "bad records")
        if len(self.bad_files) == 1:
            text = f"{head} in {next(iter(self.bad_files))}: " + "; ".join(w for _, w in self.located)
        else:
            text = (f"{head} in {len(self.bad_files)} files: "
                    + "; ".join(f"{name} {what}" for name, what in self.located))
        if total > len(self.located):
            kinds = ", ".join(f"{n} {kind}" for kind, n in self.kinds.most_common())
            text += f" (first {len(self.located)} of {total} shown; {kinds})"
        return text

    def _binary(self) -> str:
        if not self.binary:
            return ""
        n = len(self.binary)
        text = (f"skipped {_plural(n, 'file that is', 'files that are')} binary, not text: "
                + ", ".join(f"{name} (a NUL byte at offset {nul})"
                            for name, nul in self.binary[:self.shown]))
        return text + (f" (first {self.shown} of {n} shown)" if n > self.shown else "")

    def _replaced(self) -> str:
        if not self.replacements:
            return ""
        files = list(self.replacements.items())
        total = sum(n for n, _ in self.replacements.values())
        several = len(files) > 1
        places = ", ".join(
            f"{name} ({f'{n}, ' if several else ''}"
            f"{'at line' if n == 1 else 'the first at line'} {line})"
            for name, (n, line) in files[:self.shown])
        text = (f"replaced {_plural(total, 'byte that is', 'bytes that are')} not UTF-8 with "
                f"U+FFFD in {places}")
        return text + (f" (first {self.shown} of {len(files)} files shown)"
                       if len(files) > self.shown else "")


def read_records(files: list[tuple[str, Path]], text_field: str, report: ReadReport,
                 fmt: str = "text") -> Iterator[tuple[str, str]]:
    """(key, text) for every good record; what was skipped or replaced goes into `report`.
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
            yield from _jsonl(name, data, text_field, report, fmt)
        else:
            yield from _text_file(name, data, report)


def _jsonl(name: str, data: bytes, field: str, report: ReadReport,
           fmt: str = "text") -> Iterator[tuple[str, str]]:
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            report.skip(name, "not UTF-8", f"line {lineno} is not UTF-8 (byte 0x{line[e.start]:02x} "
                                           f"at column {e.start + 1})")
            continue
        except json.JSONDecodeError as e:
            report.skip(name, "not JSON", f"line {lineno} is not JSON ({e.msg} at column {e.colno})")
            continue
        if fmt != "text":
            text, reason = to_record(obj, fmt)
            if reason:
                report.skip(name, reason, f"line {lineno}: {reason}")
            else:
                yield f"{name}:{lineno}", text
            continue
        if not isinstance(obj, dict):
            report.skip(name, "not a JSON object",
                        f"line {lineno} is not a JSON object (it is {_json_kind(obj)})")
            continue
        if field not in obj:
            report.skip(name, f"field {field!r} missing", f"line {lineno}: field {field!r} is missing")
            continue
        text = obj[field]
        if not isinstance(text, str):
            report.skip(name, f"field {field!r} not a string",
                        f"line {lineno}: field {field!r} is {_json_kind(text)}")
            continue
        if text:
            yield f"{name}:{lineno}", text


def _json_kind(value) -> str:
    """What a JSON value is, in words: "an int", "null", "a list" ..."""
    if value is None:
        return "null"
    kinds = {bool: "a boolean", int: "an int", float: "a float", str: "a string", list: "a list",
             dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


def _text_file(name: str, data: bytes, report: ReadReport) -> Iterator[tuple[str, str]]:
    """The records of a text file. Bytes that are not UTF-8 become U+FFFD (counted), so one
    bad byte costs no text around it; a binary file (a NUL byte in its first BINARY_PROBE
    bytes, git's test) is skipped whole."""
    nul = data.find(b"\0", 0, BINARY_PROBE)
    if nul >= 0:
        report.skip_binary(name, nul)
        return
    for i, (offset, chunk) in enumerate(_chunks(data)):
        text = chunk.decode("utf-8", errors="replace")
        added = text.count("\ufffd") - chunk.count("\ufffd".encode())
        if added:
            # Each U+FFFD stands for 1-3 bad bytes; the valid text re-encodes to its own bytes.
            bad_bytes = len(chunk) - (len(text.encode()) - 3 * added)
            try:
                chunk.decode("utf-8")
            except UnicodeDecodeError as e:
                report.replaced(name, bad_bytes, data.count(b"\n", 0, offset + e.start) + 1)
        yield f"{name}#{i}", text


def _chunks(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of each record of a text file."""
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
            yield start, data[start:end]
        start = end
