"""`python -m pjit_llm.convert import|export`: Llama-family checkpoints to and from Hugging Face.

import --hf DIR --out RUN_DIR [--dtype D]
    reads config.json and the safetensors shards of DIR and writes a run directory
    (config.yaml, params/, the tokenizer files) that generate, evaluate and
    `train.init_from=RUN_DIR` read like a trained run.
export --run RUN_DIR [--step S] --out DIR [--dtype D] [--shard-size 2GB]
    writes config.json and safetensors shards that LlamaForCausalLM.from_pretrained loads.

Both directions go tensor by tensor so that host memory never holds the model: import
memory-maps the shards and builds each parameter with `jax.make_array_from_callback`, whose
callback reads only the rows and layers of the shard a device holds; export pulls one layer
of one parameter to the host, writes it and lets it go. Output is assembled in a temporary
sibling directory and renamed when complete.
"""

import argparse
import dataclasses
import functools
import json
import math
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from pjit_llm import hf_config, safetensors_io
from pjit_llm.config import Config, DataConfig, MeshConfig, TrainConfig
from pjit_llm.data.tokenizer import HFTokenizer
from pjit_llm.errors import UserError, run_cli
from pjit_llm.export import PARAMS_DIR, params_location, restore_partial, run_config
from pjit_llm.mesh import make_mesh
from pjit_llm.sharding import Layout, check_divisible, param_shardings
from pjit_llm.train_step import abstract_model

# (our path, HF name, leading dims of ours that form HF's input axis). HF Linear weights are
# (out, in): ours (D, H, K) is q_proj (H*K, D) transposed, so 1; wo (H, K, D) is o_proj
# (D, H*K) transposed, so 2. 0: the same layout. "{i}" is the layer.
LAYER_WEIGHTS = [
    (("blocks", "attn_norm", "scale"), "model.layers.{i}.input_layernorm.weight", 0),
    (("blocks", "attn", "wq"), "model.layers.{i}.self_attn.q_proj.weight", 1),
    (("blocks", "attn", "wk"), "model.layers.{i}.self_attn.k_proj.weight", 1),
    (("blocks", "attn", "wv"), "model.layers.{i}.self_attn.v_proj.weight", 1),
    (("blocks", "attn", "wo"), "model.layers.{i}.self_attn.o_proj.weight", 2),
    (("blocks", "mlp_norm", "scale"), "model.layers.{i}.post_attention_layernorm.weight", 0),
    (("blocks", "mlp", "w_gate"), "model.layers.{i}.mlp.gate_proj.weight", 1),
    (("blocks", "mlp", "w_up"), "model.layers.{i}.mlp.up_proj.weight", 1),
    (("blocks", "mlp", "w_down"), "model.layers.{i}.mlp.down_proj.weight", 1),
]
TOP_WEIGHTS = [
    (("embed",), "model.embed_tokens.weight", 0),
    (("final_norm", "scale"), "model.norm.weight", 0),
    (("unembed",), "lm_head.weight", 1),
]
# Files of a Hugging Face tokenizer copied along with the weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def to_ours(w: np.ndarray, shape: tuple[int, ...], in_dims: int) -> np.ndarray:
    return w.T.reshape(shape) if in_dims else w


def to_hf(a: np.ndarray, in_dims: int) -> np.ndarray:
    return a.reshape(math.prod(a.shape[:in_dims]), -1).T if in_dims else a


def _path(keys) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in keys)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def hf_tensors(model) -> list[tuple[str, tuple, int, int | None, tuple[int, ...]]]:
    """Every HF tensor of a model config, in HF's order: (name, our path, in_dims, layer or
    None, HF shape)."""
    shapes = {_path(p): v.shape for p, v in
              jax.tree_util.tree_leaves_with_path(abstract_model(model, None)[1], is_leaf=_is_var)}

    def hf_shape(shape, in_dims):  # (out, in) for a Linear weight
        return (math.prod(shape[in_dims:]), math.prod(shape[:in_dims])) if in_dims else shape

    embed, *rest = [(name, path, in_dims, None, hf_shape(shapes[path], in_dims))
                    for path, name, in_dims in TOP_WEIGHTS if path in shapes]
    layers = [(name.format(i=i), path, in_dims, i, hf_shape(shapes[path][1:], in_dims))
              for i in range(model.num_layers) for path, name, in_dims in LAYER_WEIGHTS]
    return [embed, *layers, *rest]


# ---------------------------------------------------------------- import


def import_hf(hf_dir: Path, out: Path, dtype: str | None = None) -> Path:
    """Convert a Hugging Face Llama directory into a run directory at `out`, with parameters in
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
    model, _ = hf_config.model_config(raw, str(config_path), dtype)
    tensors = safetensors_io.SafetensorsDir(hf_dir)
    wanted = hf_tensors(model)
    _check_tensors(tensors, wanted, model.tie_embeddings, hf_dir)
    # The weights as stored decide, not config.json's `dtype`, which may say otherwise.
    stored = sorted({tensors.dtype(name).name for name, *_ in wanted})
    param_dtype, note = hf_config.import_dtype(stored, dtype)
    model = dataclasses.replace(model, param_dtype=param_dtype)
    if note:
        print(note, flush=True)

    # Parameters are sharded over as many devices as the width divides (FSDP over `embed`,
    # the only sharded axis with these rules), so no device needs room for the whole model.
    fsdp = max(k for k in range(1, jax.device_count() + 1)
               if jax.device_count() % k == 0 and model.embed_dim % k == 0)
    layout = Layout(make_mesh(MeshConfig(data=1, fsdp=fsdp), jax.devices()[:fsdp]),
                    Config().mesh.rules)
    _, abstract = abstract_model(model, layout)
    check_divisible(layout, abstract)
    by_path: dict[tuple, list] = {}
    for name, path, in_dims, layer, _ in wanted:
        by_path.setdefault(path, []).append((name, in_dims, layer))
    np_dtype = jax.numpy.dtype(model.param_dtype)

    def build(keys, var, sharding):
        sources, shape, sharding = by_path[_path(keys)], var.shape, sharding.get_value()
        if sources[0][2] is None:  # one HF tensor: each device reads the rows of its shard
            name, in_dims, _ = sources[0]
            return var.replace(jax.make_array_from_callback(
                shape, sharding, lambda index: np.asarray(
                    to_ours(tensors[name], shape, in_dims)[index], np_dtype)))
        # Stacked layers: written into the sharded array one layer at a time, so the host never
        # holds more than one layer (a callback would build all layers of a shard at once).
        layer_sharding = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))
        stacked = _zeros(shape, np_dtype, sharding)
        for i, (name, in_dims, _) in enumerate(sources):
            layer = np.asarray(to_ours(tensors[name], shape[1:], in_dims), np_dtype)
            stacked = _set_layer(stacked, jax.device_put(layer, layer_sharding), i)
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
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
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
    sharding_of = dict(jax.tree_util.tree_leaves_with_path(shardings, is_leaf=_is_var))
    for keys, var in jax.tree_util.tree_leaves_with_path(abstract, is_leaf=_is_var):
        item = build(keys, var, sharding_of[keys])
        for key in reversed(_path(keys)):
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
def _set_layer(stacked, layer, i):
    """stacked[i] = layer, in place (the stacked buffer is donated)."""
    return jax.lax.dynamic_update_index_in_dim(stacked, layer[None], i, 0)


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
                        "model has parts a Llama decoder does not (biases, other layers); "
                        "it cannot be imported")
    for name, shape in needed.items():
        got = tensors.shape(name)
        if got != tuple(shape):
            raise UserError(f"{hf_dir}: tensor {name} has shape {list(got)} but config.json "
                            f"implies {list(shape)}; the weights do not match the config")


# ---------------------------------------------------------------- export


def export_hf(run_dir: Path, out: Path, step: int | None, dtype: str | None,
              shard_bytes: int) -> tuple[Path, int]:
    """Write a run's parameters (of checkpoint `step`, default the latest) as a transformers
    Llama directory at `out`; returns (out, the step written: 0 for an imported run)."""
    cfg = run_config(run_dir)
    if out.exists():
        raise UserError(f"{out} already exists; remove it or pass another --out")
    dtype = dtype or cfg.model.param_dtype
    np_dtype = np.dtype(jax.numpy.dtype(dtype))
    where, prefix, step = params_location(cfg, step)
    targets = {_path(p): v for p, v in
               jax.tree_util.tree_leaves_with_path(abstract_model(cfg.model, None)[1], is_leaf=_is_var)}
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
        return np.ascontiguousarray(to_hf(a, in_dims), dtype=np_dtype)

    eos = HFTokenizer(cfg.data.tokenizer_path).eos_id if cfg.data.tokenizer == "hf" else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        safetensors_io.write_dir(tmp, specs, tensor, shard_bytes, {"format": "pt"})
        current.clear()
        config = hf_config.hf_config(cfg.model, dtype, eos)
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


def _return_freed_memory() -> None:
    """Have glibc give large freed buffers straight back to the system. By default it raises
    its mmap threshold after the first large free and then keeps freed tensors in the heap,
    so the process's memory grows with every tensor converted instead of staying near the
    largest one."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: 1 MiB, fixed
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m pjit_llm.convert", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("import", help="Hugging Face Llama directory -> run directory")
    i.add_argument("--hf", required=True, type=Path, help="directory with config.json and *.safetensors")
    i.add_argument("--out", required=True, type=Path, help="the run directory to create")
    i.add_argument("--dtype", choices=("bfloat16", "float32"),
                   help="parameter dtype (default: the checkpoint's, float32 for a float16 "
                   "one; float32 for fine-tuning)")
    e = sub.add_parser("export", help="run directory -> Hugging Face Llama directory")
    e.add_argument("--run", required=True, type=Path, help="a training or imported run directory")
    e.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    e.add_argument("--out", required=True, type=Path, help="the directory to create")
    e.add_argument("--dtype", choices=("bfloat16", "float32"),
                   help="weight dtype (default: the run's model.param_dtype)")
    e.add_argument("--shard-size", default="2GB", help="largest safetensors file (default 2GB)")
    args = p.parse_args(argv)
    _return_freed_memory()
    if args.command == "import":
        out = import_hf(args.hf.absolute(), args.out.absolute(), args.dtype)
        print(f"imported {args.hf} to {out}; generate with `python -m pjit_llm.generate --run "
              f"{out} --prompt ...`, fine-tune with `train.init_from={out}`")
    else:
        shard_bytes = safetensors_io.parse_size(args.shard_size)
        out, step = export_hf(args.run.absolute(), args.out.absolute(), args.step, args.dtype,
                              shard_bytes)
        print(f"exported step {step} of {args.run} to {out} (LlamaForCausalLM.from_pretrained "
              "reads it)")


if __name__ == "__main__":
    run_cli(main)
