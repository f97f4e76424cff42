"""The builder: the vocabulary follows the tokenizer, batches that do not split over the mesh
are refused in one line, the attention kernel is resolved without changing what the run
records, and conversions place FSDP over the devices the model's width divides."""

import jax
import pytest

from conftest import build_on, tiny_config
from pjit_llm.errors import UserError
from pjit_llm.placement import place_for_conversion
from pjit_llm.training.build import build


def test_vocabulary_follows_the_tokenizer_and_is_refused_when_too_small():
    cfg = tiny_config("model.vocab_size=0")
    vocab = lambda **kw: (lambda m: (m.vocab_size, m.real_vocab_size))(  # noqa: E731
        build(cfg, devices=jax.devices()[:1], **kw).cfg.model)
    assert vocab(tokenizer_vocab=300) == (384, 300)  # ids 300-383 pad: never predicted
    assert vocab() == (384, 257)  # bytes + end: 257
    assert vocab(tokenizer_vocab=32_000) == (32_000, 0)  # 0: all are real
    with pytest.raises(UserError) as e:
        build(tiny_config("model.vocab_size=256"), tokenizer_vocab=300)
    assert str(e.value) == ("model.vocab_size=256 is smaller than the tokenizer's 300 tokens; "
                            "raise it or set 0 to follow the tokenizer")


@pytest.mark.parametrize("overrides, mesh, message", [
    (["data.batch_size=12"], {"data": 8}, "micro-batch of 12 sequences (data.batch_size / "
     "train.grad_accum) is not divisible by the 8 batch shards (data); use a batch size that "
     "is a multiple of 8 x train.grad_accum"),
    (["train.grad_accum=4"], {"data": 2, "fsdp": 4}, "micro-batch of 4 sequences (data.batch_size / "
     "train.grad_accum) is not divisible by the 8 batch shards (dataxfsdp)"),
])
def test_a_batch_that_does_not_split_over_the_mesh_is_refused_in_one_line(overrides, mesh, message):
    with pytest.raises(UserError) as e:
        build_on(tiny_config(*overrides), mesh)
    assert message in str(e.value) and "\n" not in str(e.value)
    # A batch split over tensor-parallel devices alone needs no such division.
    assert build_on(tiny_config(*overrides), tensor=4).mesh.devices.size == 4


def test_attention_is_resolved_but_the_config_keeps_what_was_asked(capsys):
    parts = build_on(tiny_config("model.attention=auto"))
    assert parts.cfg.model.attention == "auto" and parts.model.attention == "xla"
    assert "attention: XLA" in capsys.readouterr().out
    # The state plan carries the shardings the steps are compiled with; nothing is allocated.
    for plan, sharding in zip(jax.tree.leaves(parts.abstract_state), jax.tree.leaves(parts.shardings)):
        assert isinstance(plan, jax.ShapeDtypeStruct) and plan.sharding == sharding


@pytest.mark.parametrize("width, heads, kv_heads, fsdp", [(64, 8, 4, 8), (36, 6, 3, 4), (40, 4, 2, 8),
                                                          (42, 3, 3, 2)])
def test_conversion_places_fsdp_over_the_devices_the_width_divides(width, heads, kv_heads, fsdp):
    cfg = tiny_config(f"model.embed_dim={width}", f"model.num_heads={heads}",
                      f"model.num_kv_heads={kv_heads}", "data.batch_size=3")  # no batch is fed
    parts = place_for_conversion(cfg)
    assert dict(parts.mesh.shape) == {"data": 1, "stage": 1, "fsdp": fsdp, "context": 1,
                                      "tensor": 1, "expert": 1}
    assert list(parts.mesh.devices.flat) == jax.devices()[:fsdp]
    assert parts.model.attention == "xla"
    embed = parts.param_shardings["embed"]
    assert embed.spec == jax.sharding.PartitionSpec(None, "fsdp" if fsdp > 1 else None)
