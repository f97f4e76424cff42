"""SIGTERM/SIGINT ask the loop to stop after the current step (it then saves and exits 0);
a second signal stops the process at once.

With several processes, all must stop after the same step (a save is a collective). The
first process to be asked writes a target step a safe margin ahead into the coordinator's
key-value store; every process reads it each step and stops there.
"""

import signal
import sys

import jax

from pjit_llm.errors import first_line
from pjit_llm.parallel.distributed import exit_lost, kv_client, kv_set_once, kv_try_get

# Steps dispatched and not yet finished, at most (on CPU and across processes).
MAX_IN_FLIGHT = 16
# Steps past the asker's step where all stop: loops drift at most MAX_IN_FLIGHT steps apart.
STOP_MARGIN = 2 * MAX_IN_FLIGHT
_STOP_KEY = "pjit_llm/stop_after_step"


class StopRequest:
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def stop_after(self, step: int) -> bool:
        """Whether to stop after `step`, agreed across processes."""
        if jax.process_count() == 1:
            return self.requested
        target = agreed_stop_step(kv_client(), step + STOP_MARGIN if self.requested else None)
        if target is not None and self.signal_name is None:
            self.signal_name = "another process's stop request"
        return target is not None and step >= target

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested:  # the second signal: leave now, the default way
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.signal_name = signal.Signals(signum).name
        print(f"{self.signal_name} received: stopping after this step and saving a checkpoint "
              "(send it again to exit at once)", file=sys.stderr, flush=True)


def agreed_stop_step(client, proposed: int | None) -> int | None:
    """The step all processes stop after: the one in the coordinator's key-value store, else
    `proposed` when given (the first process to write it wins), else None."""
    try:
        target = kv_try_get(client, _STOP_KEY)
        if target is None and proposed is not None:
            kv_set_once(client, _STOP_KEY, str(proposed))
            target = kv_try_get(client, _STOP_KEY)
    except Exception as e:  # a swallowed failure would lose the request: this process trains on
        exit_lost(0, jax.process_count(), f"the coordinator's key-value store failed: "
                  f"{first_line(e)}")
    return None if target is None else int(target)
