"""What every family's Hugging Face mapping shares: reading config.json numbers and rotary
settings as transformers 4 (`rope_theta`, `rope_scaling`) and 5 (`rope_parameters`) write
them, the parameter dtype of an import, and tensor layouts: HF Linear weights are (out, in),
ours keep heads and head dims apart, and our vocabulary is padded.

A family's `hf.py` gives its config conversion and its tables of weights: (our path, HF name,
leading dims of ours that form HF's input axis), "{i}" standing for the layer and, in a
mixture of experts' stacked (layers, experts, ...) weights, "{j}" for the expert: one HF tensor
per layer and expert. A model whose layers are of two kinds stacks each kind apart (a
mixture of experts with dense layers: `blocks` and `dense_blocks`), and its table names the
weights of both.
"""

import dataclasses
import math
import typing

import jax
import numpy as np

from pjit_llm.errors import UserError
from pjit_llm.models.decoder_config import DecoderConfig, DType
from pjit_llm.models.layers import padded_vocab
from pjit_llm.parallel.layout import is_variable

# Our parameters are float32 or bfloat16; a checkpoint stored otherwise (float16) is converted,
# by default to float32, which holds every float16 and bfloat16 value exactly.
PARAM_DTYPES = typing.get_args(DType)
_HELD_EXACTLY = {"float32": {"float32", "float16", "bfloat16"}, "bfloat16": {"bfloat16"}}
WeightTable = list[tuple[tuple[str, ...], str, int]]


def import_dtype(stored: list[str], chosen: str | None) -> tuple[str, str | None]:
    """(parameter dtype, a line saying how the weights change dtype or None) for a checkpoint
    whose weights are stored in `stored` (sorted names) and a dtype the user chose or None:
    the checkpoint's own when it is one of ours, else float32."""
    dtype = chosen or (stored[0] if len(stored) == 1 and stored[0] in PARAM_DTYPES else "float32")
    if set(stored) == {dtype}:
        return dtype, None
    exact = "exact" if set(stored) <= _HELD_EXACTLY[dtype] else "rounded"
    note = f"the checkpoint is {' and '.join(stored)}; its weights are converted to {dtype} ({exact})"
    if chosen is None and dtype == "float32":
        note += "; pass --dtype bfloat16 to halve the memory"
    return dtype, note


def number(table: dict, name: str, cast, where: str, default=None):
    value = table.get(name)
    value = default if value is None else value
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: field {name}={value!r} is missing or not a valid {cast.__name__}; "
                        "is it the model's config.json?") from None


def rope_settings(hf: dict, refuse, source: str, theta_default: float = 10000.0) -> dict:
    """Our rope_* keys from config.json; `refuse(what)` makes the error for a kind we lack."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = number(params, "rope_theta", float, source, hf.get("rope_theta", theta_default))
    kind = params.get("rope_type", params.get("type", "default"))
    value = lambda name, cast=float: number(params, name, cast, f"{source} rope scaling")  # noqa: E731
    if kind == "default":
        return {"rope_theta": theta}
    if kind == "linear":
        return {"rope_theta": theta, "rope_scaling": "linear", "rope_factor": value("factor")}
    if kind == "llama3":
        return {"rope_theta": theta, "rope_scaling": "llama3", "rope_factor": value("factor"),
                "rope_low_freq_factor": value("low_freq_factor"),
                "rope_high_freq_factor": value("high_freq_factor"),
                "rope_original_max_len": value("original_max_position_embeddings", int)}
    raise refuse(f"rope scaling {kind!r}")


def rope_json(cfg: DecoderConfig) -> dict:
    """config.json's rotary keys for `cfg`, in both spellings (transformers 4 and 5)."""
    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling == "linear":
        rope.update(rope_type="linear", factor=cfg.rope_factor)
    elif cfg.rope_scaling == "llama3":
        rope.update(rope_type="llama3", factor=cfg.rope_factor,
                    low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_len)
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    return {"rope_theta": cfg.rope_theta,
            "rope_scaling": None if cfg.rope_scaling == "none" else scaling,
            "rope_parameters": rope}


# Our parameters' vocabulary dimension: it holds the padding ids (model.real_vocab_size and
# above), which Hugging Face's tensors do not.
VOCAB_DIM = {("embed",): 0, ("unembed",): 1}


def unpadded_shape(model: DecoderConfig, path: tuple, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of our parameter `path` without the vocabulary's padding ids."""
    if path not in VOCAB_DIM:
        return tuple(shape)
    dim = VOCAB_DIM[path]
    return (*shape[:dim], model.true_vocab, *shape[dim + 1:])


def zero_padded(w: np.ndarray, shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    """`w[index]` as if `w` were padded with zeros at the end of each dimension to `shape`
    (reads only the rows of `w` the index covers)."""
    ranges = [range(*s.indices(n)) for s, n in zip(index, shape)]
    block = w[tuple(slice(r.start, max(r.start, min(r.stop, n))) for r, n in zip(ranges, w.shape))]
    out = np.zeros([len(r) for r in ranges], w.dtype)
    out[tuple(slice(0, n) for n in block.shape)] = block
    return out


def to_ours(w: np.ndarray, shape: tuple[int, ...], in_dims: int) -> np.ndarray:
    return w.T.reshape(shape) if in_dims else w


def to_hf(a: np.ndarray, in_dims: int) -> np.ndarray:
    return a.reshape(math.prod(a.shape[:in_dims]), -1).T if in_dims else a


def param_path(keys) -> tuple[str, ...]:
    """A parameter's tree path as plain strings, e.g. ("blocks", "attn", "wq")."""
    return tuple(str(getattr(k, "key", k)) for k in keys)


def hf_tensors(model: DecoderConfig, abstract_params, layer_weights: WeightTable,
               top_weights: WeightTable, places: list[tuple[str, int]] | None = None
               ) -> list[tuple[str, tuple, int, tuple | None, tuple[int, ...]]]:
    """Every HF tensor of a model, in HF's order: (name, our path, in_dims, its index in our
    stacked parameter ((place,) or (place, expert)) or None, HF shape), from its abstract
    parameters and the family's tables (a weight the model lacks, such as an untied
    unembedding, is left out). `places`: each layer's stack and place in it, where a model
    stacks its layers of two kinds apart (models/decoder.py `layer_places`); by default
    layer i is place i of `blocks`. A layer takes the table's weights under its stack."""
    shapes = {param_path(p): unpadded_shape(model, param_path(p), v.shape)
              for p, v in jax.tree_util.tree_leaves_with_path(
                  abstract_params, is_leaf=is_variable)}

    def hf_shape(shape, in_dims):  # (out, in) for a Linear weight
        return (math.prod(shape[in_dims:]), math.prod(shape[:in_dims])) if in_dims else shape

    embed, *rest = [(name, path, in_dims, None, hf_shape(shapes[path], in_dims))
                    for path, name, in_dims in top_weights if path in shapes]
    layers = []
    for i, (stack, place) in enumerate(places or [("blocks", i) for i in range(model.num_layers)]):
        for path, name, in_dims in layer_weights:
            if path not in shapes or path[0] != stack:
                continue
            if "{j}" not in name:
                layers.append((name.format(i=i), path, in_dims, (place,),
                               hf_shape(shapes[path][1:], in_dims)))
                continue
            layers += [(name.format(i=i, j=j), path, in_dims, (place, j),
                        hf_shape(shapes[path][2:], in_dims)) for j in range(shapes[path][1])]
    return [embed, *layers, *rest]


def decoder_fields(hf: dict, source: str, refuse, theta_default: float = 10000.0) -> dict:
    """The DecoderConfig keys every Llama-like config.json gives (sizes, norms, rotary), with
    the vocabulary padded as a tokenizer's is, so that it shards over any mesh: the true size
    is kept, and the padding never predicted nor exported. Biases are refused: no family here
    computes them."""
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise refuse(f"{flag}=true (biases)")
    if hf.get("pretraining_tp", 1) != 1:
        raise refuse(f"pretraining_tp={hf['pretraining_tp']}")
    field = lambda name, cast, default=None: number(hf, name, cast, source, default)  # noqa: E731
    H, V = field("num_attention_heads", int), field("vocab_size", int)
    return dict(
        vocab_size=padded_vocab(V), real_vocab_size=0 if padded_vocab(V) == V else V,
        num_layers=field("num_hidden_layers", int), embed_dim=field("hidden_size", int),
        num_heads=H, num_kv_heads=field("num_key_value_heads", int, H),
        mlp_dim=field("intermediate_size", int),
        max_len=field("max_position_embeddings", int, 2048),
        norm_eps=field("rms_norm_eps", float, 1e-6),
        tie_embeddings=field("tie_word_embeddings", bool, False),
        **rope_settings(hf, refuse, source, theta_default))


def declared_dtype(hf: dict) -> str:
    return str(hf.get("dtype") or hf.get("torch_dtype") or "float32")


def with_param_dtype(cfg: DecoderConfig, hf: dict, param_dtype: str | None):
    """(`cfg` with its parameters in `param_dtype`, by default the dtype config.json declares
    when it is one of ours, else float32; validated, the declared dtype)."""
    dtype = declared_dtype(hf)
    cfg = dataclasses.replace(cfg, param_dtype=param_dtype or import_dtype([dtype], None)[0])
    cfg.validate()
    return cfg, dtype


def decoder_json(cfg: DecoderConfig, dtype: str, eos_id: int | None) -> dict:
    """config.json's keys for what every family here shares."""
    out = {
        "vocab_size": cfg.true_vocab, "hidden_size": cfg.embed_dim,
        "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_size, "max_position_embeddings": cfg.max_len,
        "rms_norm_eps": cfg.norm_eps, **rope_json(cfg),
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
        "attention_dropout": 0.0, "initializer_range": cfg.init_std, "use_cache": True,
        "dtype": dtype, "torch_dtype": dtype,
    }
    if eos_id is not None:
        out["eos_token_id"] = eos_id
    return out
