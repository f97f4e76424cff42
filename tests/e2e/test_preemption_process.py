"""Agreeing on a stop step through a real coordinator's key-value store (in a subprocess: the
runtime must start before JAX's backend, which this test process has already made)."""

import textwrap

from conftest import run_module
from pjit_llm.launch import free_port
from pjit_llm.parallel.distributed import LOST_PROCESS_EXIT

# This process's view of the store: its first `stale_reads` reads came before another
# process's write (or before the coordinator went away), so they found nothing. Writes go to
# the real client, and so do its errors.
_SCRIPT = """
import sys
import jax
jax.distributed.initialize("127.0.0.1:{port}", 1, 0)
from pjit_llm.parallel.distributed import kv_client
from pjit_llm.training.preemption import _STOP_KEY, agreed_stop_step

class StaleReads:
    def __init__(self, client, stale_reads):
        self.client, self.stale_reads = client, stale_reads

    def key_value_try_get(self, key):
        if self.stale_reads:
            self.stale_reads -= 1
            return None
        return self.client.key_value_try_get(key)

    def key_value_set(self, key, value):
        return self.client.key_value_set(key, value)

client = kv_client()
assert agreed_stop_step(client, None) is None
client.key_value_set(_STOP_KEY, "40")  # another process asked first, after this one read
print("agreed", agreed_stop_step(StaleReads(client, 1), 35), flush=True)
jax.distributed.shutdown()  # the coordinator is gone
print("returned", agreed_stop_step(StaleReads(client, 2), 35), flush=True)
"""


def test_only_another_processs_earlier_request_is_ignored(tmp_path):
    result = run_module(None, cwd=tmp_path, code=textwrap.dedent(_SCRIPT.format(port=free_port())),
                        timeout=120)
    # The runtime's "key already exists" means the first request's step holds for all.
    assert "agreed 40" in result.stdout, result.stderr[-2000:]
    # Any other failure would lose this process's request while the others stop: it leaves
    # as a process that lost the coordinator does.
    assert "returned" not in result.stdout
    assert result.returncode == LOST_PROCESS_EXIT, result.stderr[-2000:]
    assert "error: lost process 0 of 1 (the coordinator's key-value store failed: UNAVAILABLE" \
        in result.stderr

