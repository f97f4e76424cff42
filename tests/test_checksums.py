"""Per-array checksums: independent of the mesh, and one changed element is caught and named."""

import jax
import numpy as np

from conftest import build_on, tiny_config
from pjit_llm.checkpoint import checksums


def test_checksums_are_mesh_independent_and_catch_one_changed_element():
    state = build_on(tiny_config(), data=8).init_state()
    # bfloat16 copies exercise the 16-bit path beside the float32 and int32 arrays.
    tree = {"state": state, "bf16": jax.tree.map(lambda p: p.astype(jax.numpy.bfloat16), state.params)}
    shardings = build_on(tiny_config(), fsdp=2, tensor=4).shardings
    other = jax.tree.map(lambda a, s: jax.device_put(np.asarray(a), s), tree,
                         {"state": shardings, "bf16": shardings.params})
    wq = other["bf16"]["blocks"]["attn"]["wq"]
    assert wq[...].sharding != tree["bf16"]["blocks"]["attn"]["wq"][...].sharding
    saved = checksums.compute(tree)
    assert saved == checksums.compute(other) and checksums.first_mismatch(saved, other) is None
    # One element changed by one bit (the lowest of a bfloat16 element) is caught and named.
    value = wq[...]
    bits = jax.lax.bitcast_convert_type(value[1, 5, 3, 2], jax.numpy.uint16) ^ 1
    wq.set_value(value.at[1, 5, 3, 2].set(jax.lax.bitcast_convert_type(bits, jax.numpy.bfloat16)))
    changed = checksums.compute(other)["arrays"]
    assert [k for k in changed if changed[k] != saved["arrays"][k]] == ["bf16/blocks/attn/wq/value"]
    assert checksums.first_mismatch(saved, other) == \
        "bf16/blocks/attn/wq/value differs from its checksum at save"

