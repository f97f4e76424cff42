"""The one error type a user sees: a single line naming the problem and the fix; and
recognising the library errors that become one."""

import errno
import logging
import re
import sys
import threading
from collections.abc import Callable

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a full disk, an exhausted quota
_OS_ERROR = re.compile(r"os_error_code='(\d+)'")  # TensorStore's note of the errno behind it


class UserError(Exception):
    """A problem the user can fix (config, mesh, data, files). Entry points print it and exit 2."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception's first line (libraries raise pages), or its type when it says nothing:
    the reason part of a one-line message."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


def causes(error: BaseException) -> list[BaseException]:
    """`error` and the exceptions it was raised from or while handling, outermost first."""
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def os_error_codes(error: BaseException) -> list[int]:
    """The operating-system error numbers behind `error`: of the OSErrors in its chain and
    those TensorStore notes in its messages."""
    codes = []
    for e in causes(error):
        if isinstance(e, OSError) and e.errno is not None:
            codes.append(e.errno)
        codes += [int(code) for code in _OS_ERROR.findall(str(e))]
    return codes


def out_of_space(error: BaseException) -> bool:
    """Whether `error`, raised writing files, came from a full disk or an exhausted quota."""
    return any(code in NO_SPACE for code in os_error_codes(error))


def quiet_teardown() -> None:
    """For the rest of the process, drop what background threads report (exceptions in
    threads, errors nobody retrieved, logged errors): called when a fatal error that a
    UserError reports in one line leaves writers failing on their own, e.g. on a full disk."""
    sys.unraisablehook = lambda unraisable: None
    threading.excepthook = lambda args: None
    for name in ("absl", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def run_cli(main: Callable[[], None]) -> None:
    """Run an entry point; a UserError becomes one line on stderr and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def require_positive(section, prefix: str, *names: str) -> None:
    """Refuse a config value that must be positive: `prefix.name=value must be positive`."""
    for name in names:
        if getattr(section, name) <= 0:
            raise UserError(f"{prefix}.{name}={getattr(section, name)} must be positive")
