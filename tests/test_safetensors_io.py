"""The safetensors reader and writer: shards with an index, bf16, damaged files refused."""

import json

import ml_dtypes
import numpy as np
import pytest

from pjit_llm.interop import safetensors_io as st
from pjit_llm.errors import UserError


def _tensors():
    rng = np.random.default_rng(0)
    return {"a": rng.standard_normal((3, 5)).astype(np.float32),
            "b": rng.standard_normal((7,)).astype(ml_dtypes.bfloat16),
            "c": np.arange(12, dtype=np.int64).reshape(2, 3, 2),
            "d": np.array(2.5, np.float32)}


def test_sharded_write_reads_back_exactly_with_an_index(tmp_path):
    tensors = _tensors()
    specs = [(k, v.dtype, v.shape) for k, v in tensors.items()]
    pulled = []
    files = st.write_dir(tmp_path, specs, lambda k: pulled.append(k) or tensors[k], shard_bytes=64)
    assert pulled == list(tensors)  # one tensor at a time, in order
    assert len(files) == 4 and (tmp_path / st.INDEX_FILE).is_file()
    index = json.loads((tmp_path / st.INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    back = st.SafetensorsDir(tmp_path)
    assert back.names() == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and np.array_equal(np.asarray(back[k]), v), k
    with pytest.raises(UserError, match="tensor e is missing"):
        back["e"]


def test_the_reference_implementation_reads_our_files_and_we_read_its(tmp_path):
    numpy_api = pytest.importorskip("safetensors.numpy")
    tensors = {k: v for k, v in _tensors().items() if v.dtype != ml_dtypes.bfloat16}
    st.write_file(tmp_path / "ours.safetensors", [(k, v.dtype, v.shape) for k, v in tensors.items()],
                  tensors.values(), {"format": "pt"})
    theirs = numpy_api.load_file(str(tmp_path / "ours.safetensors"))
    assert all(np.array_equal(theirs[k], v) for k, v in tensors.items())
    numpy_api.save_file(tensors, str(tmp_path / "theirs.safetensors"))
    f = st.SafetensorsFile(tmp_path / "theirs.safetensors")
    assert all(np.array_equal(f[k], v) for k, v in tensors.items())


def test_damaged_files_are_refused_in_one_line(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(UserError, match="not a safetensors file"):
        st.SafetensorsDir(tmp_path)
    t = _tensors()["a"]
    st.write_file(bad, [("a", t.dtype, t.shape)], [t])
    bad.write_bytes(bad.read_bytes()[:-8])  # truncated
    with pytest.raises(UserError, match="damaged"):
        st.SafetensorsDir(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no \\*.safetensors"):
        st.SafetensorsDir(tmp_path / "empty")


def test_sizes_parse():
    assert st.parse_size("2GB") == 2 * 10**9
    assert st.parse_size("1.5GiB") == int(1.5 * 2**30)
    assert st.parse_size("1000") == 1000
    with pytest.raises(UserError, match="shard-size"):
        st.parse_size("lots")
