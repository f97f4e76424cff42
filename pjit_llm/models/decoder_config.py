"""The `model` section every family shares: sizes, rotary positions, dtypes and how the
step runs (remat, attention kernel, matmul kind). A family's package subclasses it
(models/<family>/config.py) and registers the subclass in models/families.py, which picks it by
`model.family`."""

from dataclasses import dataclass
from typing import ClassVar, Literal

from pjit_llm.errors import UserError, require_positive

DType = Literal["float32", "bfloat16"]


@dataclass(frozen=True)
class DecoderConfig:
    """What every family's `model` section holds; a family's config subclasses it with its
    defaults, its own keys and the class-level traits its layers read."""

    # Which family computes the model (models/families.py); it picks the section's class, so
    # the keys below are those of every family and a family adds its own.
    family: str = "llama"
    vocab_size: int = 0  # 0: the tokenizer's vocabulary, rounded up to a multiple of 128
    # How many of the vocab_size ids are real tokens (0: all). The ids above pad the
    # vocabulary to a multiple of 128 so that it shards over the mesh; their logits are masked
    # out of the loss, evaluation and sampling, and a Hugging Face export drops them.
    real_vocab_size: int = 0
    num_layers: int = 2
    embed_dim: int = 256
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 0  # 0: embed_dim / num_heads; families such as Qwen3 set it apart
    mlp_dim: int = 768
    max_len: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: Literal["none", "linear", "llama3"] = "none"  # stretch positions (long context)
    rope_factor: float = 1.0  # linear, llama3: how many times the context is stretched
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max_len: int = 8192  # llama3: the context length before stretching
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    param_dtype: DType = "float32"
    dtype: DType = "float32"  # compute dtype; the loss is always float32
    scan_layers: bool = True
    # What the backward pass keeps of each layer's forward pass (the rest is recomputed):
    # none keeps all; full keeps nothing; dots keeps every matmul output; proj keeps the
    # linear projections' outputs; proj_attn those and attention's output and softmax
    # statistics (no attention forward in the backward pass); proj_offload keeps the
    # projections in host memory.
    remat: Literal["none", "full", "dots", "proj", "proj_attn", "proj_offload"] = "none"
    attention: Literal["auto", "xla", "cudnn"] = "auto"  # auto: cuDNN where it runs, else XLA
    segment_mask: bool = True  # false: packed documents may attend to each other (faster)
    # cuDNN: >0 gives the kernel each row's document offsets (up to this many documents a
    # row) instead of a dense L x L mask; a batch with a fuller row uses the mask (exact,
    # slower). 0: always the mask. XLA's kernel always takes the mask.
    max_segments: int = 0
    loss_chunk: int = 0  # >0: cross-entropy over chunks of this many positions (less memory)
    # Generation: decode steps per iteration of the device loop, which checks whether every
    # prompt has ended between iterations (more: fewer GPU round trips, longer compiles).
    decode_unroll: int = 1
    # The blocks' seven projections: default multiplies in the compute dtype; fp8 in
    # float8 (e4m3 forward, e5m2 gradients, per-tensor scales, float32 accumulation).
    # The vocabulary projection, attention and norms stay in the compute dtype.
    matmul: Literal["default", "fp8"] = "default"
    # fp8's scales: current takes each operand's amax right before quantizing it (an extra
    # pass over it); delayed takes the largest of its last fp8_amax_history steps' amaxes,
    # kept per projection in the training state (the step records this one's alongside).
    # Evaluate, generate and export run current scaling.
    fp8_scaling: Literal["current", "delayed"] = "current"
    fp8_amax_history: int = 16
    # How the stored parameters are quantized: int8 in an export written with --quantize int8
    # (models/quantize.py), which evaluate and generate read; training refuses it.
    quantize: Literal["none", "int8"] = "none"

    # Traits of the family's computation, fixed by its config class rather than set per run.
    qk_norm: ClassVar[bool] = False  # RMSNorm of each query and key head before rotary
    norm_plus_one: ClassVar[bool] = False  # RMSNorm scales by (1 + weight), weights from 0
    scale_embeddings: ClassVar[bool] = False  # embeddings times sqrt(embed_dim)
    mlp_activation: ClassVar[str] = "silu"  # of the gate: silu (SwiGLU) or gelu_tanh (GeGLU)
    # Sliding-window layers (a family with them makes these keys): how many positions a local
    # layer's query sees, itself included (0: no local layers), and their rotary base.
    sliding_window: ClassVar[int] = 0
    rope_local_theta: ClassVar[float] = 0.0

    def local_layers(self) -> tuple[bool, ...]:
        """Which layers attend within the sliding window only (none here)."""
        return (False,) * self.num_layers

    @property
    def attention_scale(self) -> float:
        """What the query-key products are multiplied by before the softmax."""
        return self.head_size ** -0.5

    @property
    def head_size(self) -> int:
        """Each attention head's width."""
        return self.head_dim or self.embed_dim // self.num_heads

    @property
    def true_vocab(self) -> int:
        """The ids the model can predict (the rest of vocab_size is padding)."""
        return self.real_vocab_size or self.vocab_size

    def validate(self) -> None:
        require_positive(self, "model", "num_layers", "embed_dim", "num_heads", "num_kv_heads",
                  "mlp_dim", "max_len", "decode_unroll", "rope_theta", "norm_eps", "init_std",
                  "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                  "rope_original_max_len", "fp8_amax_history")
        if self.rope_scaling == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise UserError("model.rope_high_freq_factor must exceed model.rope_low_freq_factor "
                            "for rope_scaling=llama3")
        for name, zero in (("vocab_size", "follow the tokenizer"), ("loss_chunk", "no chunks"),
                           ("real_vocab_size", "all of model.vocab_size"),
                           ("max_segments", "a dense mask"),
                           ("head_dim", "embed_dim / num_heads")):
            if getattr(self, name) < 0:
                raise UserError(f"model.{name} must be >= 0 (0: {zero})")
        if self.vocab_size and self.real_vocab_size > self.vocab_size:
            raise UserError(f"model.real_vocab_size={self.real_vocab_size} exceeds "
                            f"model.vocab_size={self.vocab_size}; it counts the real tokens among them")
        if not self.head_dim and self.embed_dim % self.num_heads:
            raise UserError(f"model.num_heads={self.num_heads} does not divide model.embed_dim="
                            f"{self.embed_dim}; pick a head count that divides the width, or "
                            "set model.head_dim")
        if self.head_size % 2:
            which = (f"model.head_dim={self.head_dim}" if self.head_dim else
                     f"head dimension embed_dim/num_heads={self.head_size}")
            raise UserError(f"{which} must be even for rotary embeddings; change "
                            "model.head_dim, model.embed_dim or model.num_heads")
        if self.attention == "cudnn" and self.dtype != "bfloat16":
            raise UserError("model.attention=cudnn needs model.dtype=bfloat16 (cuDNN attention "
                            "runs in half precision); set it or use model.attention=xla")
        if self.fp8_scaling == "delayed" and self.matmul != "fp8":
            raise UserError("model.fp8_scaling=delayed scales fp8 multiplies; set "
                            "model.matmul=fp8 too, or model.fp8_scaling=current")
        if self.num_heads % self.num_kv_heads:
            raise UserError(f"model.num_kv_heads={self.num_kv_heads} must divide model.num_heads="
                            f"{self.num_heads} (grouped-query attention)")
