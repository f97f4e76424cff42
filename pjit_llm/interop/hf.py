"""Hugging Face checkpoints to and from run directories, for every model family.

`import_hf` reads config.json and the safetensors shards of a model directory and writes a
run directory (config.yaml, params/, the tokenizer files) that generate, evaluate and
`train.init_from=RUN_DIR` read like a trained run; config.json's `model_type` picks the
family. `export_hf` writes config.json and safetensors shards that the family's
`*ForCausalLM.from_pretrained` loads. Each family's own mapping (config fields, tensor names)
is in models/<family>/hf.py, the layouts they share in models/hf_format.py.

Both directions go tensor by tensor so that host memory never holds the model: import
memory-maps the shards and builds each parameter with `jax.make_array_from_callback`, whose
callback reads only the rows and layers of the shard a device holds; export pulls one layer
of one parameter to the host, writes it and lets it go. Output is assembled in a temporary
sibling directory and renamed when complete.
"""

import dataclasses
import functools
import json
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from pjit_llm.checkpoint.run_dir import PARAMS_DIR, run_config, write_config
from pjit_llm.checkpoint.runs import params_location, restore_partial
from pjit_llm.config import Config, DataConfig, TrainConfig
from pjit_llm.data.tokenizer import HFTokenizer
from pjit_llm.errors import UserError
from pjit_llm.interop import safetensors_io
from pjit_llm.models.decoder import layer_places
from pjit_llm.models.decoder_config import DecoderConfig
from pjit_llm.models.families import abstract_model, family_of, hf_family
from pjit_llm.models.hf_format import (import_dtype, param_path, to_hf, to_ours, unpadded_shape,
                                       zero_padded)
from pjit_llm.models.hf_format import hf_tensors as tensors_of
from pjit_llm.parallel.layout import is_variable, param_shardings
from pjit_llm.placement import place_for_conversion

# Files of a Hugging Face tokenizer copied along with the weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


# ---------------------------------------------------------------- import


def import_hf(hf_dir: Path, out: Path, dtype: str | None = None) -> Path:
    """Convert a Hugging Face model directory into a run directory at `out`, with parameters in
    `dtype` (default: the dtype the weights are stored in, float32 for a float16 checkpoint);
    a line on stdout says when the weights change dtype."""
    if not hf_dir.is_dir():
        raise UserError(f"--hf {hf_dir} is not a directory; pass a model directory holding "
                        "config.json and *.safetensors")
    if out.exists():
        raise UserError(f"{out} already exists; remove it or pass another --out")
    config_path = hf_dir / "config.json"
    try:
        raw = json.loads(config_path.read_text())
    except OSError:
        raise UserError(f"{hf_dir} has no readable config.json; pass a Hugging Face model "
                        "directory") from None
    except ValueError:
        raise UserError(f"{config_path} is not valid JSON") from None
    family = hf_family(raw, str(config_path))
    model, _ = family.hf_model_config(raw, str(config_path), dtype)
    tensors = safetensors_io.SafetensorsDir(hf_dir)
    wanted = hf_tensors(model)
    _check_tensors(tensors, wanted, model.tie_embeddings, hf_dir)
    # The weights as stored decide, not config.json's `dtype`, which may say otherwise.
    stored = sorted({tensors.dtype(name).name for name, *_ in wanted})
    param_dtype, note = import_dtype(stored, dtype)
    model = dataclasses.replace(model, param_dtype=param_dtype)
    if note:
        print(note, flush=True)

    # Sharded over as many devices as the width divides: no device holds the whole model.
    layout = place_for_conversion(Config(model=model)).layout
    _, abstract = abstract_model(model, layout)
    by_path: dict[tuple, list] = {}
    for name, path, in_dims, layer, _ in wanted:
        by_path.setdefault(path, []).append((name, in_dims, layer))
    np_dtype = jax.numpy.dtype(model.param_dtype)

    def build(keys, var, sharding):
        path = param_path(keys)
        sources, shape, sharding = by_path[path], var.shape, sharding.get_value()
        if sources[0][2] is None:  # one HF tensor: each device reads the rows of its shard
            name, in_dims, _ = sources[0]
            unpadded = unpadded_shape(model, path, shape)  # the vocabulary's padding: zeros
            return var.replace(jax.make_array_from_callback(
                shape, sharding, lambda index: np.asarray(zero_padded(
                    to_ours(tensors[name], unpadded, in_dims), shape, index), np_dtype)))
        # Stacked layers (and experts): written into the sharded array one HF tensor at a
        # time, so the host never holds more than one layer (a callback would build all
        # layers of a shard at once).
        stacked = _zeros(shape, np_dtype, sharding)
        for name, in_dims, index in sources:
            piece_sharding = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[len(index):]))
            piece = np.asarray(to_ours(tensors[name], shape[len(index):], in_dims), np_dtype)
            stacked = _set_layer(stacked, jax.device_put(piece, piece_sharding),
                                 tuple(np.int32(i) for i in index))
        return var.replace(stacked)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _save_one_by_one(tmp, abstract, param_shardings(layout, abstract), build)
        copied = [f for f in TOKENIZER_FILES if (hf_dir / f).is_file()]
        for f in copied:
            shutil.copyfile(hf_dir / f, tmp / f)
        data = DataConfig(tokenizer="hf", tokenizer_path=str(out / "tokenizer.json")) \
            if "tokenizer.json" in copied else DataConfig()
        data = dataclasses.replace(data, seq_len=min(data.seq_len, model.max_len))
        cfg = Config(model=model, data=data, train=TrainConfig(run_dir=str(out)))
        cfg.validate()
        write_config(tmp, cfg)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _save_one_by_one(tmp: Path, abstract, shardings, build) -> None:
    """Write the parameters to tmp/params one at a time with Orbax's partial save: each is
    built, saved and dropped before the next, so memory holds one parameter, never the model.
    What it leaves is an ordinary PyTree checkpoint item that restore_partial reads."""
    from orbax.checkpoint.experimental.v1 import partial

    staging = tmp / "params.partial"
    sharding_of = dict(jax.tree_util.tree_leaves_with_path(shardings, is_leaf=is_variable))
    for keys, var in jax.tree_util.tree_leaves_with_path(abstract, is_leaf=is_variable):
        item = build(keys, var, sharding_of[keys])
        for key in reversed(param_path(keys)):
            item = {key: item}
        partial.save(staging, nnx.State(item))
        del item
    partial.finalize(staging)
    (staging / "state").rename(tmp / PARAMS_DIR)
    shutil.rmtree(staging)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _zeros(shape, dtype, sharding):
    return jax.lax.with_sharding_constraint(jnp.zeros(shape, dtype), sharding)


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked, piece, index):
    """stacked[index] = piece for an index of leading dims (layer, or layer and expert), in
    place (the stacked buffer is donated)."""
    start = (*index, *(np.int32(0),) * piece.ndim)
    return jax.lax.dynamic_update_slice(stacked, piece.reshape((1,) * len(index) + piece.shape),
                                        start)


def _check_tensors(tensors, wanted, tied: bool, hf_dir: Path) -> None:
    present = tensors.names()
    needed = {name: shape for name, *_, shape in wanted}
    missing = [n for n in needed if n not in present]
    if missing:
        raise UserError(f"{hf_dir}: tensor {missing[0]} is missing from the safetensors files "
                        f"({len(missing)} missing in all); the weights do not match config.json")
    ignored = {"lm_head.weight"} if tied else set()  # a tied copy some checkpoints carry
    extra = sorted(n for n in present - set(needed) - ignored if not n.endswith("rotary_emb.inv_freq"))
    if extra:
        raise UserError(f"{hf_dir}: unexpected tensor {extra[0]} ({len(extra)} in all): the "
                        "model has parts its family's decoder here does not (biases, other "
                        "layers); it cannot be imported")
    for name, shape in needed.items():
        got = tensors.shape(name)
        if got != tuple(shape):
            raise UserError(f"{hf_dir}: tensor {name} has shape {list(got)} but config.json "
                            f"implies {list(shape)}; the weights do not match the config")


# ---------------------------------------------------------------- export


def export_hf(run_dir: Path, out: Path, step: int | None, dtype: str | None,
              shard_bytes: int) -> tuple[Path, int]:
    """Write a run's parameters (of checkpoint `step`, default the latest) as a transformers
    model directory of its family at `out`; returns (out, the step written: 0 for an imported run)."""
    cfg = run_config(run_dir)
    if cfg.model.quantize != "none":
        raise UserError(f"{run_dir} holds {cfg.model.quantize} parameters, which Hugging Face "
                        f"{cfg.model.family.capitalize()} files do not; export the run it was "
                        "written from instead")
    if out.exists():
        raise UserError(f"{out} already exists; remove it or pass another --out")
    dtype = dtype or cfg.model.param_dtype
    np_dtype = np.dtype(jax.numpy.dtype(dtype))
    where, prefix, step = params_location(cfg, step)
    targets = {param_path(p): v for p, v in
               jax.tree_util.tree_leaves_with_path(abstract_model(cfg.model, None)[1], is_leaf=is_variable)}
    # Parameter by parameter (all layers of one before the next): each is read alone into
    # host memory (no device involved), written a layer at a time, and dropped before the next.
    tensors = sorted(hf_tensors(cfg.model), key=lambda t: list(targets).index(t[1]))
    specs = [(name, np_dtype, shape) for name, _, _, _, shape in tensors]
    sources = {name: (path, in_dims, layer) for name, path, in_dims, layer, _ in tensors}
    current: dict[tuple, jax.Array] = {}

    def tensor(name):
        path, in_dims, layer = sources[name]
        if path not in current:
            current.clear()
            current[path] = restore_partial(where, prefix + path, targets[path])[...]
        a = current[path] if layer is None else current[path][layer]
        if layer is None:  # without the vocabulary's padding ids
            a = a[tuple(slice(0, n) for n in unpadded_shape(cfg.model, path, a.shape))]
        return np.ascontiguousarray(to_hf(a, in_dims), dtype=np_dtype)

    eos = HFTokenizer(cfg.data.tokenizer_path).eos_id if cfg.data.tokenizer == "hf" else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        safetensors_io.write_dir(tmp, specs, tensor, shard_bytes, {"format": "pt"})
        current.clear()
        config = family_of(cfg.model).hf_config(cfg.model, dtype, eos)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if cfg.data.tokenizer == "hf":  # the tokenizer and its companions, where they exist
            source = Path(cfg.data.tokenizer_path)
            shutil.copyfile(source, tmp / "tokenizer.json")
            for f in TOKENIZER_FILES[1:]:
                if (source.parent / f).is_file():
                    shutil.copyfile(source.parent / f, tmp / f)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, step


def return_freed_memory() -> None:
    """Have glibc give large freed buffers straight back to the system. By default it raises
    its mmap threshold after the first large free and then keeps freed tensors in the heap,
    so the process's memory grows with every tensor converted instead of staying near the
    largest one."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: 1 MiB, fixed
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def hf_tensors(model: DecoderConfig) -> list[tuple[str, tuple, int, int | None, tuple[int, ...]]]:
    """Every HF tensor of a model config, in HF's order (models/hf_format.py: hf_tensors):
    (name, our path, in_dims, index in our stacked parameter or None, HF shape)."""
    family = family_of(model)
    return tensors_of(model, abstract_model(model, None)[1], family.hf_layer_weights,
                      family.hf_top_weights, layer_places(family.model.dense_layers(model)))
