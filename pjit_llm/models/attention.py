"""Which attention kernel a run uses: XLA's, or cuDNN's fused flash attention.

`model.attention=auto` takes cuDNN where this backend can run it for the model's shapes and
otherwise XLA, saying why in one line; `cudnn` insists and refuses with the reason. The check
compiles a one-layer call of the real kernel, so whatever cuDNN itself rejects (head size,
GPU generation, library version) is caught here rather than in the middle of compiling the
training step.
"""

import dataclasses

import jax
import jax.numpy as jnp

from pjit_llm.models.attention_kernels import attend, packed_segments, same_segment_mask
from pjit_llm.models.decoder_config import DecoderConfig
from pjit_llm.errors import UserError, first_line
from pjit_llm.metrics import info


def cudnn_unsupported(cfg: DecoderConfig, seq_len: int) -> str | None:
    """Why cuDNN attention cannot run this model here (with its segment mask, dense or as
    document offsets per model.max_segments), or None when it can."""
    backend = jax.default_backend()
    if backend != "gpu":
        return f"it needs a GPU and the backend is {backend}"
    if cfg.dtype != "bfloat16":
        return f"it runs in bfloat16 and model.dtype={cfg.dtype}"
    q = jax.ShapeDtypeStruct((1, seq_len, cfg.num_heads, cfg.head_size), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, seq_len, cfg.num_kv_heads, cfg.head_size), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)

    def one_layer(q, k, v, ids):
        mask = None
        if cfg.segment_mask:
            mask = (packed_segments(ids, cfg.max_segments) if cfg.max_segments
                    else same_segment_mask(ids))
        return attend(q, k, v, mask, True, "cudnn").astype(jnp.float32).sum()

    try:
        jax.jit(jax.grad(one_layer, argnums=(0, 1, 2))).lower(q, kv, kv, ids).compile()
    except Exception as e:  # cuDNN says no in many ways: NotImplementedError, XlaRuntimeError
        return first_line(e)
    return None


def resolve_attention(cfg: DecoderConfig, seq_len: int, context: int = 1,
                      announce: bool = True) -> DecoderConfig:
    """`cfg` with model.attention set to the kernel this run will use: xla or cudnn, said in
    one line with `announce`. A sequence sharded over `context` shards attends under a dense
    mask of global positions, which cuDNN's kernel has no mask type for: XLA's then."""
    say = info if announce else (lambda line: None)
    if cfg.attention == "xla":
        return cfg
    if any(cfg.local_layers()):
        reason = ("the sliding-window layers attend under a mask that changes from layer to "
                  "layer, which it is not given here")
        if cfg.attention == "cudnn":
            raise UserError(f"model.attention=cudnn cannot be used: {reason}; set "
                            "model.attention=auto or xla")
        say(f"attention: XLA (cuDNN flash attention not used: {reason})")
        return dataclasses.replace(cfg, attention="xla")
    if context > 1:
        reason = (f"a sequence split into {context} context shards needs a mask from global "
                  "positions, which it has no mask type for")
        if cfg.attention == "cudnn":
            raise UserError(f"model.attention=cudnn cannot be used: {reason}; set "
                            "model.attention=auto or xla, or mesh.context=1")
        say(f"attention: XLA (cuDNN flash attention not used: {reason})")
        return dataclasses.replace(cfg, attention="xla")
    reason = cudnn_unsupported(cfg, seq_len)
    if reason is not None and cfg.segment_mask and cfg.max_segments:
        without = dataclasses.replace(cfg, max_segments=0)
        if cudnn_unsupported(without, seq_len) is None:  # cuDNN, but with the dense mask
            say(f"attention: cuDNN flash attention under a dense segment mask (document "
                f"offsets, model.max_segments={cfg.max_segments}, not used: {reason})")
            return dataclasses.replace(without, attention="cudnn")
    if reason is None:
        if cfg.attention == "auto":
            say("attention: cuDNN flash attention")
        return dataclasses.replace(cfg, attention="cudnn")
    if cfg.attention == "cudnn":
        raise UserError(f"model.attention=cudnn cannot be used: {reason}; "
                        "set model.attention=auto (falls back to XLA) or xla")
    say(f"attention: XLA (cuDNN flash attention not used: {reason})")
    return dataclasses.replace(cfg, attention="xla")
