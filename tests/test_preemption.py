"""Stop requests: the first SIGTERM/SIGINT asks the loop to stop after the current step, the
handlers are put back afterwards."""

import os
import signal

import pytest

from pjit_llm.training.preemption import StopRequest


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_asks_to_stop_after_the_current_step(sig, capsys):
    before = signal.getsignal(sig)
    with StopRequest() as stop:
        assert not stop.requested and not stop.stop_after(3)
        os.kill(os.getpid(), sig)  # handled in this (the main) thread before kill returns
        assert stop.requested and stop.stop_after(4)
        assert stop.signal_name == sig.name
    assert signal.getsignal(sig) is before
    assert f"{sig.name} received: stopping after this step" in capsys.readouterr().err
