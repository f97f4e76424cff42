"""What a failed checkpoint restore means; keeping a failed Orbax operation's echoes quiet.

A restore that fails is evidence of damage only when the files say so: a file the restore
needs is missing or does not parse, or TensorStore reports stored bytes it cannot use
(DATA_LOSS; OUT_OF_RANGE, a read past the end of a truncated file; FAILED_PRECONDITION, a
failed decompression; NOT_FOUND, a missing file). Anything else (device memory exhausted, an
I/O error of the operating system, a program error) says nothing about the files: the
checkpoint stays where it is.
"""

import errno
import json
import logging
import re
import sys
from pathlib import Path

from pjit_llm.checkpoint import checksums
from pjit_llm.errors import causes, first_line, os_error_codes

# TensorStore status codes that report bad stored bytes, as the first word of its messages.
DAMAGE_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "FAILED_PRECONDITION", "NOT_FOUND")
# Items every save writes; the checksums item is absent from checkpoints saved before it.
ITEMS = ("state", "data", "config")
_STATUS = re.compile(r"^([A-Z_]+): ")


def damage(step_dir: Path, error: BaseException) -> str | None:
    """Why the checkpoint `step_dir` is damaged, shown by its files or by `error` (raised
    restoring it); None when nothing shows damage."""
    try:
        missing = unreadable_file(step_dir)
    except OSError:
        return None  # the files cannot even be read: an I/O problem, not evidence
    return missing or stored_bytes_error(error)


def unreadable_file(step_dir: Path) -> str | None:
    """The first file a restore needs that is missing or does not parse, as a reason."""
    for item in ITEMS:
        if not (step_dir / item).is_dir():
            return f"{item}/ is missing"
    if not (step_dir / "state" / "manifest.ocdbt").is_file():
        return "state/manifest.ocdbt is missing"
    positions = sorted((step_dir / "data").glob("*.json"))
    if not positions:
        return "data/ holds no iterator position"
    json_files = [step_dir / "state" / "_METADATA", step_dir / "config" / "metadata", *positions]
    if (step_dir / checksums.ITEM).is_dir():
        json_files.append(step_dir / checksums.ITEM / "metadata")
    for path in json_files:
        name = path.relative_to(step_dir)
        if not path.is_file():
            return f"{name} is missing"
        try:
            json.loads(path.read_bytes())
        except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
            return f"{name} is corrupt"
    return None


def stored_bytes_error(error: BaseException) -> str | None:
    """The first line of the error in `error`'s chain that reports bad stored bytes, or None;
    None too when an operating-system error other than a missing file is behind it."""
    if any(code != errno.ENOENT for code in os_error_codes(error)):
        return None
    for e in causes(error):
        status = _STATUS.match(str(e))
        if (isinstance(e, (json.JSONDecodeError, FileNotFoundError))
                or status and status.group(1) in DAMAGE_CODES):
            return first_line(e)
    return None


def quiet_orbax_echoes() -> None:
    """Keep the echoes of a failed Orbax save or restore off the console: Orbax logs the
    failure from each of its threads with a traceback, TensorStore's late callbacks into the
    operation's closed event loop print 'Event loop is closed', and its abandoned coroutines
    print their exceptions when collected. The failure itself is raised where the caller
    waits on the operation, and reported there in one line. Installed once."""
    absl = logging.getLogger("absl")
    if _drop_orbax_errors not in absl.filters:
        absl.addFilter(_drop_orbax_errors)
    if not getattr(sys.unraisablehook, "quiets_orbax", False):
        sys.unraisablehook = _UnraisableFilter(sys.unraisablehook)


def _from_orbax(filename: str) -> bool:
    return "/orbax/" in filename.replace("\\", "/")


def _drop_orbax_errors(record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and _from_orbax(record.pathname))


class _UnraisableFilter:
    quiets_orbax = True

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, unraisable) -> None:
        value, owner = unraisable.exc_value, unraisable.object
        code = getattr(owner, "cr_code", None)  # an abandoned coroutine of a failed operation
        if (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"
                or code is not None and _from_orbax(code.co_filename)):
            return
        self.previous(unraisable)
