"""Choosing the attention kernel: cuDNN is refused off a GPU with the reason; auto falls back
to XLA and says why."""

import jax
import pytest

from pjit_llm.errors import UserError
from pjit_llm.models.attention import resolve_attention


def test_cudnn_attention_is_refused_off_gpu_and_auto_falls_back(tiny, capsys):
    assert jax.default_backend() == "cpu"
    cfg = tiny("model.dtype=bfloat16", "model.attention=cudnn").model
    with pytest.raises(UserError, match="model.attention=cudnn cannot be used: it needs a GPU "
                                        "and the backend is cpu; set model.attention=auto"):
        resolve_attention(cfg, 32)
    resolved = resolve_attention(tiny("model.dtype=bfloat16").model, 32)
    assert resolved.attention == "xla"
    assert "attention: XLA (cuDNN flash attention not used: it needs a GPU" in capsys.readouterr().out



def test_xla_is_kept_without_a_check(tiny, capsys):
    cfg = tiny("model.attention=xla").model
    assert resolve_attention(cfg, 32) is cfg and not capsys.readouterr().out
