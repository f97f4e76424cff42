"""One candidate compiled ahead of time for abstract state and batch on the emulated devices
(nothing is allocated or run): XLA's per-device memory plan, the program's FLOPs and bytes,
and each collective with its bytes, the mesh axes its device groups span and whether those
groups reach across hosts. Results are cached on disk, keyed by the candidate's config, the
jax version and the device count, so a second plan of the same shape compiles nothing.

For a GPU kind the program is the one a GPU would run (gpu_program.py), read from XLA's dump.
The program is compiled on one process's emulated devices, so its mesh has no host
boundaries; which collectives cross hosts follows from the candidate's mesh.dcn_* sizes (the
pieces across hosts are the outer part of each axis, as parallel/mesh.py lays them out).

Attention's share of the memory plan. The emulated compile runs XLA's attention, which
materialises (batch, heads, seq, seq) scores, probabilities and mask in memory; a GPU's flash
kernel (cuDNN) never allocates them. Asked for (`scores=True`, for GPU kinds), the same
candidate is compiled a second time with the sequence halved and the batch doubled: the same
tokens, so the state, the activations and the logits are the same size, while every
(seq, seq) buffer is half as large (batch x seq^2 = tokens x seq). The drop in the memory plan
is half the (seq, seq) buffers' share, so twice it is their share at the full length: a
measurement of this program's buffer assignment, not a count of copies. The plan for a GPU
is XLA's plan less that share (planner.py); the estimate's traffic likewise drops the bytes of
(seq, seq) arrays read from the HLO (hlo.py).
"""

import dataclasses
import gc
import hashlib
import json
import math
import os
import time
from pathlib import Path

import jax
import numpy as np

from pjit_llm import __version__, perf
from pjit_llm.config import Config
from pjit_llm.errors import UserError
from pjit_llm.models.expert_products import BLOCKS_SCOPE
from pjit_llm.parallel.axes import AXIS_NAMES
from pjit_llm.planning.gpu_program import compile_for_gpu
from pjit_llm.planning.hlo import program_cost
from pjit_llm.training.build import build
from pjit_llm.training.measure import abstract_batch

# Settings that change nothing in the compiled step.
_IRRELEVANT = ("data.source", "data.paths", "data.name", "data.tokenizer_path", "data.num_workers",
               "data.data_dir", "train.run_dir", "train.steps", "train.log_every",
               "train.eval_every", "checkpoint", "distributed", "mesh.emulate_devices")


ANALYSIS_VERSION = 11  # what an entry holds; a change makes old entries unreadable by key


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("PJIT_LLM_PLAN_CACHE") or Path(root) / "pjit_llm" / "plans")


def cache_key(cfg: Config, devices: int, variant: str = "") -> str:
    raw = cfg.to_dict()
    for key in _IRRELEVANT:
        section, _, name = key.partition(".")
        if name:
            raw[section].pop(name, None)
        else:
            raw.pop(section, None)
    text = json.dumps([raw, jax.__version__, __version__, devices, jax.default_backend(),
                       ANALYSIS_VERSION, variant],
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def crossed_axes(group: list[int], sizes: tuple[int, ...], dcn: tuple[int, ...]):
    """The mesh axes a device group spans, and whether it spans hosts."""
    coords = np.array(np.unravel_index(np.array(group), sizes)).T  # (members, axes)
    varies = [a for i, a in enumerate(AXIS_NAMES) if len(set(coords[:, i])) > 1]
    inner = np.array(sizes) // np.array(dcn)
    hosts = {tuple(c // inner) for c in coords}
    return varies, len(hosts) > 1


def compile_step(parts, gpu: bool) -> tuple[str, dict]:
    """(optimized HLO text, memory plan) of the built step: the program XLA:CPU runs, or with
    `gpu` the one a GPU would (gpu_program.py, in a process `prepare`d for it)."""
    lowered = parts.train_step.lower(parts.abstract_state, abstract_batch(parts))
    if gpu:
        return compile_for_gpu(lowered)
    compiled = lowered.compile()
    return compiled.as_text(), perf.compiled_memory(compiled) or {}


def _peak_memory(cfg: Config, devices: int, gpu: bool) -> float | None:
    """XLA's memory plan of `cfg`'s step alone (the halved-sequence twin of `analyse`)."""
    try:
        parts = build(cfg, devices=jax.devices()[:devices], announce=False)
    except UserError:
        return None
    peak = compile_step(parts, gpu)[1].get("peak")
    del parts
    gc.collect()
    return peak


def score_memory(cfg: Config, devices: int, peak: float | None, gpu: bool = False) -> float:
    """Bytes of the memory plan held by (seq, seq) buffers: twice the drop at half the
    sequence and twice the batch (the same tokens). 0 where the twin cannot be built."""
    half = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, seq_len=cfg.data.seq_len // 2, batch_size=cfg.data.batch_size * 2))
    twin = _peak_memory(half, devices, gpu) if cfg.data.seq_len % 2 == 0 else None
    if not peak or twin is None:
        return 0.0
    return max(0.0, 2 * (peak - twin))


def blocks_share(experts: int, group: int):
    """The share of the expert blocks' loop (models/expert_products.py) a step uses, as a
    function of the loop's N blocks, under balanced routing: N = R/b + E' for R rows gathered
    over a `group` of devices and E' = experts/group here; of the R rows, R/group are this
    device's, in E' groups each padded to whole blocks."""
    here = max(experts // max(group, 1), 1)

    def share(blocks: int) -> float:
        rows_in_blocks = max(blocks - here, 0)  # R / b
        return here * math.ceil(rows_in_blocks / (group * here)) / max(blocks, 1)
    return share


def _experts_here(cfg: Config, layout) -> tuple[int, int]:
    """(experts, the devices of the expert group its tokens are gathered over)."""
    experts = getattr(cfg.model, "num_experts", 0)
    group = math.prod(layout.mesh.shape[a] for a in layout.mesh_axes("expert")
                      if a in layout.mesh_axes("batch")) if experts else 1
    return experts, group


def _shares(cfg: Config, layout) -> dict:
    experts, group = _experts_here(cfg, layout)
    return {BLOCKS_SCOPE: blocks_share(experts, group)} if experts else {}


def rows_share(cfg: Config, layout) -> float:
    """The share of the rows gathered over an expert group that this device's experts take
    under balanced routing (models/expert_dispatch.py): one in the group's devices."""
    return 1.0 / _experts_here(cfg, layout)[1]


def analyse(cfg: Config, devices: int, scores: bool = False, gpu: bool = False) -> dict:
    """Compile `cfg`'s train step on the first `devices` devices and read what it costs
    (with `scores`, also the memory its (seq, seq) buffers take: `score_memory`; with `gpu`,
    of the program a GPU would run: gpu_program.py).
    A config the builder refuses comes back as {"refused": its message}."""
    sizes = tuple(cfg.mesh.shape)
    dcn = tuple(cfg.mesh.dcn_shape)
    one_process = dataclasses.replace(cfg.mesh, **{f"dcn_{a}": 1 for a in AXIS_NAMES})
    try:
        one_process_cfg = dataclasses.replace(cfg, mesh=one_process)
        parts = build(one_process_cfg,
                      devices=jax.devices()[:devices], announce=False)
    except UserError as e:
        return {"refused": str(e)}
    start = time.perf_counter()
    text, memory = compile_step(parts, gpu)
    compile_s = time.perf_counter() - start
    cost = program_cost(text, devices, cfg.data.seq_len, cfg.model.num_heads,
                        _shares(cfg, parts.layout), rows_share(cfg, parts.layout))
    collectives = []
    for c in cost.collectives:
        axes, across = (crossed_axes(c.groups[0], sizes, dcn) if c.groups
                        else ([a for a, n in zip(AXIS_NAMES, sizes) if n > 1], math.prod(dcn) > 1))
        if c.groups and not across:  # any group reaching across hosts puts it on the network
            across = any(crossed_axes(g, sizes, dcn)[1] for g in c.groups[1:])
        collectives.append({"op": c.op, "bytes": c.bytes, "link_bytes": c.link_bytes,
                            "count": c.count, "group": c.group_size, "axes": axes,
                            "across_hosts": bool(across)})
    pipeline = parts.pipeline
    out = {"memory": memory, "flops": cost.flops, "bytes": cost.bytes,
           "collectives": collectives,
           "bubble": pipeline.bubble if pipeline else 0.0, "compile_s": compile_s,
           "attention": parts.model.attention, "score_bytes": cost.score_bytes,
           "kernels": cost.kernels, "dot_bytes": cost.dot_bytes,
           "element_ops": cost.element_ops,
           "context": cfg.mesh.context}
    del parts
    gc.collect()
    if scores:
        out["score_memory"] = score_memory(one_process_cfg, devices, memory.get("peak"), gpu)
    return out


def cached_analysis(cfg: Config, devices: int, cache_dir: Path | None,
                    scores: bool = False, compile_with=analyse,
                    variant: str = "") -> tuple[dict, bool]:
    """`compile_with` (`analyse`, or a worker's), read from the cache when it holds this
    config (and the scores' memory when asked for); (result, whether cached). `variant` names
    the program compiled, where that differs (gpu_program.VARIANT)."""
    if cache_dir is None:
        return compile_with(cfg, devices, scores), False
    path = Path(cache_dir) / f"{cache_key(cfg, devices, variant)}.json"
    if path.exists():
        try:
            found = json.loads(path.read_text())
            if not scores or "score_memory" in found or "refused" in found:
                return found, True
        except (OSError, ValueError):
            pass  # a damaged entry is compiled again
    result = compile_with(cfg, devices, scores)
    if result.get("aborted"):  # perhaps killed for memory: not a property of the config
        return result, False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)
    return result, False
