"""Every process of a run must start from the same settings.

A process started with another config computes something else (a different learning rate
trains on without a word), fails inside a collective (a different model shape) or hangs (a
different number of steps). Right after the processes join, before any of them builds a mesh,
reads data or compiles, they compare their settings through the coordinator's key-value store:
process 0 publishes its own (the resolved config, flattened, and the versions of pjit_llm and
jax); each other process compares them with its own and publishes what it found; process 0
publishes the first difference, or none, as the verdict, and every process reads it. On a
difference all of them stop with the same line (exit 2), so none is left waiting.
"""

import json
from collections.abc import Mapping

from pjit_llm.errors import UserError, first_line

_KEY = "pjit_llm/settings/"
_SAME = "same"
_MISSING = object()


def first_difference(process: int, mine: Mapping, process_0s: Mapping) -> str | None:
    """The line that refuses `process`'s settings against process 0's, or None when equal."""
    for key in [*process_0s, *(k for k in mine if k not in process_0s)]:
        ours, theirs = mine.get(key, _MISSING), process_0s.get(key, _MISSING)
        if ours != theirs:
            if key.startswith("version."):
                return (f"process {process} runs {key.removeprefix('version.')} {ours} against "
                        f"{theirs} on process 0; install the same versions on every host")
            return (f"process {process}'s config differs from process 0's at {key}: "
                    f"{_show(ours)} against {_show(theirs)}; start every process with the same "
                    "config")
    return None


def _show(value) -> str:
    return "(not set)" if value is _MISSING else json.dumps(value)


def require_same_settings(client, process_id: int, num_processes: int,
                          settings: Mapping[str, object], timeout_s: int) -> None:
    """Compare `settings` across the processes through the key-value store `client`; raise
    the same UserError in every process when one differs from process 0's."""
    timeout_ms = timeout_s * 1000
    try:
        if process_id == 0:
            client.key_value_set(_KEY + "0", json.dumps(settings))
            found = [client.blocking_key_value_get(f"{_KEY}found/{p}", timeout_ms)
                     for p in range(1, num_processes)]
            verdict = next((f for f in found if f != _SAME), _SAME)
            client.key_value_set(_KEY + "verdict", verdict)
        else:
            process_0s = json.loads(client.blocking_key_value_get(_KEY + "0", timeout_ms))
            difference = first_difference(process_id, settings, process_0s)
            client.key_value_set(f"{_KEY}found/{process_id}", difference or _SAME)
            verdict = client.blocking_key_value_get(_KEY + "verdict", timeout_ms)
    except Exception as e:  # the runtime's bare errors: a timeout, the coordinator gone
        raise UserError(f"process {process_id} could not compare its config with the other "
                        f"processes' within {timeout_s}s ({first_line(e)}); check that every "
                        "process is started, or raise distributed.init_timeout_s") from None
    if verdict != _SAME:
        raise UserError(verdict)
