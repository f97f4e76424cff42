"""Where numbers go: the console and a JSONL file in the run directory (process 0 only)."""

import json
import math
import sys
from pathlib import Path

import jax


class MetricsLog:
    def __init__(self, run_dir: Path, append: bool = False):
        """`append` continues the file of a resumed run instead of starting it afresh."""
        self.enabled = jax.process_index() == 0
        mode = "a" if append else "w"
        self._file = open(run_dir / "metrics.jsonl", mode) if self.enabled else None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        print(format_record(record), flush=True)

    def close(self) -> None:
        if self._file:
            self._file.close()


def info(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stdout, flush=True)


def format_record(record: dict) -> str:
    parts = []
    for key, value in record.items():
        if isinstance(value, float):
            value = f"{value:.4g}" if abs(value) < 1e4 or not math.isfinite(value) else f"{value:,.0f}"
        parts.append(f"{key} {value}")
    return " | ".join(parts)


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024:
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} PiB"
