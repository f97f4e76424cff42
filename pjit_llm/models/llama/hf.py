"""The Llama family in Hugging Face's format: `config.json` <-> ModelConfig, and which
safetensors tensor holds which of our parameters (in which layout).

Only what our transformer computes exactly is accepted: a Llama decoder (RMSNorm, rotary
positions with no, linear or Llama 3 scaling, grouped-query attention, SwiGLU without
biases, head dimension = width / heads). Everything else is refused by name rather than
converted into a model that silently computes something different. Both spellings of the
rotary settings are read: `rope_theta` + `rope_scaling` (transformers 4) and
`rope_parameters` (transformers 5); export writes both.
"""

import dataclasses
import math
import typing

import jax
import numpy as np

from pjit_llm.errors import UserError
from pjit_llm.models.llama.config import DType, ModelConfig
from pjit_llm.models.llama.model import abstract_model, padded_vocab
from pjit_llm.parallel.layout import is_variable

ARCHITECTURE = "LlamaForCausalLM"
# Mistral computes the same function as Llama when it has no sliding window.
_ACCEPTED = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
# Our parameters are float32 or bfloat16; a checkpoint stored otherwise (float16) is converted,
# by default to float32, which holds every float16 and bfloat16 value exactly.
PARAM_DTYPES = typing.get_args(DType)
_HELD_EXACTLY = {"float32": {"float32", "float16", "bfloat16"}, "bfloat16": {"bfloat16"}}


def model_config(hf: dict, source: str, param_dtype: str | None = None) -> tuple[ModelConfig, str]:
    """(ModelConfig, the dtype config.json declares) for an HF config dict read from `source`;
    the parameters are in `param_dtype`, by default the declared one when it is one of ours,
    else float32."""
    def refuse(what: str) -> UserError:
        return UserError(f"{source}: {what} is not supported (only Llama-family decoders that "
                         "this model computes exactly can be imported)")

    archs = hf.get("architectures") or [ARCHITECTURE]
    if len(archs) != 1 or archs[0] not in _ACCEPTED:
        raise refuse(f"architecture {', '.join(map(str, archs))}")
    if hf.get("sliding_window") is not None and archs[0] == "MistralForCausalLM":
        raise refuse(f"sliding-window attention (sliding_window={hf['sliding_window']})")
    if hf.get("hidden_act", "silu") != "silu":
        raise refuse(f"activation hidden_act={hf['hidden_act']}")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise refuse(f"{flag}=true (biases)")
    if hf.get("pretraining_tp", 1) != 1:
        raise refuse(f"pretraining_tp={hf['pretraining_tp']}")
    field = lambda name, cast, default=None: _number(hf, name, cast, source, default)  # noqa: E731
    D, H = field("hidden_size", int), field("num_attention_heads", int)
    # The vocabulary padded as a tokenizer's is, so that it shards over any mesh; the true
    # size is kept, and the padding never predicted nor exported.
    V = field("vocab_size", int)
    cfg = ModelConfig(
        vocab_size=padded_vocab(V), real_vocab_size=0 if padded_vocab(V) == V else V,
        num_layers=field("num_hidden_layers", int),
        embed_dim=D, num_heads=H, num_kv_heads=field("num_key_value_heads", int, H),
        mlp_dim=field("intermediate_size", int),
        max_len=field("max_position_embeddings", int, 2048),
        norm_eps=field("rms_norm_eps", float, 1e-6),
        tie_embeddings=field("tie_word_embeddings", bool, False),
        **_rope(hf, refuse, source))
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) != D // H:
        raise refuse(f"head_dim={head_dim} different from hidden_size/num_attention_heads={D // H}")
    dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
    cfg = dataclasses.replace(cfg, param_dtype=param_dtype or import_dtype([dtype], None)[0])
    cfg.validate()
    return cfg, dtype


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


def _number(table: dict, name: str, cast, where: str, default=None):
    value = table.get(name)
    value = default if value is None else value
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: field {name}={value!r} is missing or not a valid {cast.__name__}; "
                        "is it a Llama config.json?") from None


def _rope(hf: dict, refuse, source: str) -> dict:
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = _number(params, "rope_theta", float, source, hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    number = lambda name, cast=float: _number(params, name, cast, f"{source} rope scaling")  # noqa: E731
    if kind == "default":
        return {"rope_theta": theta}
    if kind == "linear":
        return {"rope_theta": theta, "rope_scaling": "linear", "rope_factor": number("factor")}
    if kind == "llama3":
        return {"rope_theta": theta, "rope_scaling": "llama3", "rope_factor": number("factor"),
                "rope_low_freq_factor": number("low_freq_factor"),
                "rope_high_freq_factor": number("high_freq_factor"),
                "rope_original_max_len": number("original_max_position_embeddings", int)}
    raise refuse(f"rope scaling {kind!r}")


def hf_config(cfg: ModelConfig, dtype: str, eos_id: int | None = None) -> dict:
    """The config.json of LlamaForCausalLM computing the same function as `cfg`."""
    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling == "linear":
        rope.update(rope_type="linear", factor=cfg.rope_factor)
    elif cfg.rope_scaling == "llama3":
        rope.update(rope_type="llama3", factor=cfg.rope_factor,
                    low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_len)
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    out = {
        "architectures": [ARCHITECTURE], "model_type": "llama",
        "vocab_size": cfg.true_vocab, "hidden_size": cfg.embed_dim,
        "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": None if cfg.rope_scaling == "none" else scaling,
        "rope_parameters": rope, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "initializer_range": cfg.init_std, "use_cache": True,
        "dtype": dtype, "torch_dtype": dtype,
    }
    if eos_id is not None:
        out["eos_token_id"] = eos_id
    return out


# ---------------------------------------------------------------- weights

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
# Our parameters' vocabulary dimension: it holds the padding ids (model.real_vocab_size and
# above), which Hugging Face's tensors do not.
VOCAB_DIM = {("embed",): 0, ("unembed",): 1}


def unpadded_shape(model: ModelConfig, path: tuple, shape: tuple[int, ...]) -> tuple[int, ...]:
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


def hf_tensors(model: ModelConfig) -> list[tuple[str, tuple, int, int | None, tuple[int, ...]]]:
    """Every HF tensor of a model config, in HF's order: (name, our path, in_dims, layer or
    None, HF shape)."""
    abstract = abstract_model(model, None)[1]
    shapes = {param_path(p): unpadded_shape(model, param_path(p), v.shape)
              for p, v in jax.tree_util.tree_leaves_with_path(
                  abstract, is_leaf=is_variable)}

    def hf_shape(shape, in_dims):  # (out, in) for a Linear weight
        return (math.prod(shape[in_dims:]), math.prod(shape[:in_dims])) if in_dims else shape

    embed, *rest = [(name, path, in_dims, None, hf_shape(shapes[path], in_dims))
                    for path, name, in_dims in TOP_WEIGHTS if path in shapes]
    layers = [(name.format(i=i), path, in_dims, i, hf_shape(shapes[path][1:], in_dims))
              for i in range(model.num_layers) for path, name, in_dims in LAYER_WEIGHTS]
    return [embed, *layers, *rest]
