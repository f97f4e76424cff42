"""SIGTERM/SIGINT ask the loop to stop after the current step (it then saves and exits 0);
a second signal stops the process at once."""

import signal
import sys


class StopRequest:
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

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
