"""A run directory (or an export) opened for inference: its config, its tokenizer, the model
placed on the mesh of its config, and its parameters restored into that placement."""

import dataclasses
from pathlib import Path

from pjit_llm.checkpoint.run_dir import run_config
from pjit_llm.checkpoint.runs import inference_params
from pjit_llm.config import Config
from pjit_llm.data.datasets import prepare
from pjit_llm.data.tokenizer import Tokenizer, load_tokenizer
from pjit_llm.parallel.mesh import use_emulated_devices
from pjit_llm.placement import Placement, place


def load_for_inference(run: Path, step: int | None = None, overrides=(),
                       quantize: str = "none") -> tuple[Tokenizer, Placement, object]:
    """(tokenizer, placement, parameters in model order) of the run directory (or export)
    `run` at checkpoint `step` (default the latest), on the mesh of its config with
    `overrides`, with quantize="int8" its weights quantized to int8."""
    cfg = run_config(run, overrides)
    use_emulated_devices(cfg.mesh.emulate_devices)
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path, _dataset_dir(cfg))
    # Decoding attends over a cache under a general mask, which XLA's kernel does: there is no
    # kernel to choose (and no line about it in the generated text).
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention="xla"))
    placed = place(cfg, tokenizer.vocab_size)
    params, _, _ = inference_params(placed.cfg, placed.layout, step, quantize)
    return tokenizer, placed, params


def _dataset_dir(cfg: Config) -> Path | None:
    """Where a SentencePiece model trained beside the data lives (only that needs it)."""
    if cfg.data.tokenizer != "sentencepiece" or cfg.data.tokenizer_path:
        return None
    return prepare(cfg.data).directory
