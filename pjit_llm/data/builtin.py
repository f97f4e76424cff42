"""The built-in corpus: text every Python installation ships.

The standard library's Python sources (including the language reference held in
pydoc_data/topics.py) and the Python licence. No network, no files from elsewhere; test
suites and GUI demos are left out. The corpus differs a little between Python versions.
"""

import os
import sysconfig
from pathlib import Path

_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages",
              "dist-packages", "__pycache__", "ensurepip"}


def files() -> list[tuple[str, Path]]:
    """(name relative to the standard library, path) for every file, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("test"))
        for name in sorted(filenames):
            if name.endswith(".py") or name == "LICENSE.txt":
                path = Path(dirpath, name)
                found.append((path.relative_to(root).as_posix(), path))
    return found
