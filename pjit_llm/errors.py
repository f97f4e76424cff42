"""The one error type a user sees: a single line naming the problem and the fix."""

import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem the user can fix (config, mesh, data, files). Entry points print it and exit 2."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception's first line (libraries raise pages), or its type when it says nothing:
    the reason part of a one-line message."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


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
