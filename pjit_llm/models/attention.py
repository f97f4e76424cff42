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

from pjit_llm.models.llama.config import ModelConfig
from pjit_llm.errors import UserError, first_line
from pjit_llm.metrics import info


def cudnn_unsupported(cfg: ModelConfig, seq_len: int) -> str | None:
    """Why cuDNN attention cannot run this model here, or None when it can."""
    backend = jax.default_backend()
    if backend != "gpu":
        return f"it needs a GPU and the backend is {backend}"
    if cfg.dtype != "bfloat16":
        return f"it runs in bfloat16 and model.dtype={cfg.dtype}"
    q = jax.ShapeDtypeStruct((1, seq_len, cfg.num_heads, cfg.head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, seq_len, cfg.num_kv_heads, cfg.head_dim), jnp.bfloat16)
    mask = jax.ShapeDtypeStruct((1, 1, seq_len, seq_len), jnp.bool_)

    def attend(q, k, v, mask):
        return jax.nn.dot_product_attention(q, k, v, mask=mask if cfg.segment_mask else None,
                                            is_causal=True, implementation="cudnn")

    try:
        jax.jit(jax.grad(lambda *a: attend(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))
                ).lower(q, kv, kv, mask).compile()
    except Exception as e:  # cuDNN says no in many ways: NotImplementedError, XlaRuntimeError
        return first_line(e)
    return None


def resolve_attention(cfg: ModelConfig, seq_len: int, context: int = 1,
                      announce: bool = True) -> ModelConfig:
    """`cfg` with model.attention set to the kernel this run will use: xla or cudnn, said in
    one line with `announce`. A sequence sharded over `context` shards attends under a dense
    mask of global positions, which cuDNN's kernel has no mask type for: XLA's then."""
    say = info if announce else (lambda line: None)
    if cfg.attention == "xla":
        return cfg
    if context > 1:
        reason = (f"a sequence split into {context} context shards needs a mask from global "
                  "positions, which it has no mask type for")
        if cfg.attention == "cudnn":
            raise UserError(f"model.attention=cudnn cannot be used: {reason}; set "
                            "model.attention=auto or xla, or mesh.context=1")
        say(f"attention: XLA (cuDNN flash attention not used: {reason})")
        return dataclasses.replace(cfg, attention="xla")
    reason = cudnn_unsupported(cfg, seq_len)
    if reason is None:
        if cfg.attention == "auto":
            say("attention: cuDNN flash attention")
        return dataclasses.replace(cfg, attention="cudnn")
    if cfg.attention == "cudnn":
        raise UserError(f"model.attention=cudnn cannot be used: {reason}; "
                        "set model.attention=auto (falls back to XLA) or xla")
    say(f"attention: XLA (cuDNN flash attention not used: {reason})")
    return dataclasses.replace(cfg, attention="xla")
