"""The built-in corpus: text every Python installation ships.

The standard library's Python sources (including the language reference held in
pydoc_data/topics.py) and the Python licence. No network, no files from elsewhere; test
suites and GUI demos are left out. The corpus differs a little between Python versions.
"""

import hashlib
import os
import sysconfig
from pathlib import Path

_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages",
              "dist-packages", "__pycache__", "ensurepip"}


def documents() -> list[tuple[str, bytes]]:
    """(name, content) for every document, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("test"))
        for name in sorted(filenames):
            if name.endswith(".py") or name == "LICENSE.txt":
                path = Path(dirpath, name)
                docs.append((path.relative_to(root).as_posix(), path.read_bytes()))
    return docs


def is_validation(name: str, fraction: float) -> bool:
    """A fixed pseudo-random share of documents, chosen by name so it never moves."""
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    return h / 2**64 < fraction
