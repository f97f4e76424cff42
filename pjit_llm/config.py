"""The configuration tree: frozen dataclasses read from YAML and `key.sub=value` overrides.

Every value is type-checked on the way in; an unknown key, a wrong type or an impossible
value raises UserError with one line that names the key and the fix. Checks that need the
devices (mesh sizes, divisibility of sharded dimensions) live in parallel/mesh.py and
parallel/layout.py. The `model` section belongs to the model family, whose class its `family`
key picks (models/families.py);
the `mesh` and `distributed` sections to parallel/ (parallel/settings.py, the mesh section
made from the list of mesh axes in parallel/axes.py).
"""

import dataclasses
import difflib
import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import yaml

from pjit_llm.errors import UserError, require_positive
from pjit_llm.models.decoder_config import DecoderConfig
from pjit_llm.models.families import config_class, family
from pjit_llm.parallel.settings import DistributedConfig, MeshConfig, Rules  # noqa: F401 (sections)


@dataclass(frozen=True)
class MixtureSource:
    """One source of data.mixture: the same keys as the single-source data settings, a weight
    (its share of the packed rows, so of the tokens) and a label for the metrics."""

    source: Literal["builtin", "local", "tfds"] = "builtin"
    weight: float = 1.0
    label: str = ""  # "" : builtin, the TFDS name, or the first path's file name
    paths: tuple[str, ...] = ()
    text_field: str = "text"
    name: str = ""
    train_split: str = "train"
    val_split: str = ""

    @property
    def tag(self) -> str:
        """The label in metrics (`tokens_<tag>`)."""
        if self.label:
            return self.label
        if self.source == "tfds":
            return self.name.replace("/", "_")
        if self.source == "local" and self.paths:
            return os.path.basename(self.paths[0].rstrip("/")).split(".")[0] or "local"
        return self.source


@dataclass(frozen=True)
class DataConfig:
    source: Literal["builtin", "local", "tfds"] = "builtin"
    paths: tuple[str, ...] = ()  # local: text/JSONL files, globs or directories
    text_field: str = "text"  # the JSONL field (local) or the feature (tfds) holding the text
    # text: plain documents; chat: JSONL `messages` rendered with the tokenizer's chat template,
    # loss on assistant turns; prompt_completion: JSONL `prompt`/`completion`, loss on the
    # completion. Both of the latter pack first-fit (records whole, cut at seq_len).
    format: Literal["text", "chat", "prompt_completion"] = "text"
    name: str = ""  # tfds: catalogue name, e.g. lm1b or wikitext/wikitext-103-raw-v1
    train_split: str = "train"  # tfds
    val_split: str = ""  # tfds; "" carves data.val_fraction off the training split
    data_dir: str = ""  # where datasets are prepared; "" is TFDS's default (~/tensorflow_datasets)
    download: bool = True  # tfds: download and prepare a missing dataset
    tokenizer: Literal["byte", "sentencepiece", "hf"] = "byte"
    tokenizer_path: str = ""  # .model or tokenizer.json; "" (sentencepiece): beside the data
    packing: Literal["concat", "first_fit"] = "concat"
    shuffle_window: int = 1024  # packed rows shuffled together (rows of one document spread out)
    num_workers: int = 1  # tokenizing/packing processes; 0 works in this process
    shards: int = 0  # independent streams the records are split into; 0: one per process
    seq_len: int = 128
    batch_size: int = 16  # global, in sequences
    val_fraction: float = 0.05  # share of records held out when the data has no own split
    seed: int = 0
    # Several sources drawn in proportion to their weights (data/mixture.py), instead of
    # data.source/paths/name; the settings above (tokenizer, packing, ...) apply to all.
    mixture: tuple[MixtureSource, ...] = ()

    def validate(self) -> None:
        require_positive(self, "data", "seq_len", "batch_size")
        if self.seq_len < 2:
            raise UserError("data.seq_len must be at least 2 (a token and its successor)")
        if not 0 < self.val_fraction < 1:
            raise UserError(f"data.val_fraction={self.val_fraction} must lie strictly between 0 and 1")
        if self.num_workers < 0:
            raise UserError("data.num_workers must be >= 0 (0 tokenizes in this process)")
        if self.shards < 0:
            raise UserError("data.shards must be >= 0 (0: one shard per process)")
        if self.shuffle_window < 0:
            raise UserError("data.shuffle_window must be >= 0 (0 or 1: no shuffling of rows)")
        if self.source == "local" and not self.paths:
            raise UserError("data.source=local needs data.paths: files, globs or directories")
        if self.source == "tfds" and not self.name:
            raise UserError("data.source=tfds needs data.name, a TFDS catalogue name such as lm1b")
        if self.tokenizer == "hf" and not self.tokenizer_path:
            raise UserError("data.tokenizer=hf needs data.tokenizer_path, a tokenizer.json file")
        if self.format != "text" and self.source != "local" and not self.mixture:
            raise UserError(f"data.format={self.format} reads JSONL files: set data.source=local "
                            "and data.paths")
        if self.format == "chat" and self.tokenizer != "hf":
            raise UserError("data.format=chat needs data.tokenizer=hf and data.tokenizer_path: the "
                            "chat template comes with the model's tokenizer.json")
        if self.mixture:
            self._validate_mixture()

    def _validate_mixture(self) -> None:
        for key, default in (("source", "builtin"), ("paths", ()), ("name", "")):
            if getattr(self, key) != default:
                raise UserError(f"data.mixture names its own sources; remove data.{key} (or move "
                                "it into a data.mixture entry)")
        tags = []
        for i, part in enumerate(self.mixture):
            where = f"data.mixture[{i}]"
            if not 0 < part.weight < float("inf"):
                raise UserError(f"{where}.weight={part.weight} must be positive (a share of the "
                                "tokens); drop the entry to leave the source out")
            if part.source == "local" and not part.paths:
                raise UserError(f"{where}.source=local needs {where}.paths: files, globs or "
                                "directories")
            if part.source == "tfds" and not part.name:
                raise UserError(f"{where}.source=tfds needs {where}.name, a TFDS catalogue name")
            if self.format != "text" and part.source != "local":
                raise UserError(f"{where}.source={part.source}: data.format={self.format} reads "
                                "JSONL files, so every entry needs source=local")
            if part.tag in tags:
                raise UserError(f"{where} has the label {part.tag!r} of an earlier entry; set "
                                f"{where}.label to tell them apart")
            tags.append(part.tag)


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 3e-3
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    # The warm-up and decay span schedule_start .. schedule_start + decay_steps (0: to
    # train.steps); after the span the rate stays at its end value. Extending a run: keep the
    # old span with decay_steps=<old train.steps>, or begin a new one at schedule_start.
    decay_steps: int = 0
    schedule_start: int = 0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # 0 disables clipping

    def validate(self) -> None:
        require_positive(self, "optimizer", "lr", "eps")
        for name in ("warmup_steps", "weight_decay", "clip_norm", "decay_steps", "schedule_start"):
            if getattr(self, name) < 0:
                raise UserError(f"optimizer.{name} must be >= 0")
        for name in ("min_lr_ratio", "b1", "b2"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"optimizer.{name} must lie in [0, 1]")

    def span(self, total_steps: int) -> int:
        """The steps the warm-up and decay span in a run of `total_steps`, refused when the
        warm-up does not fit in them."""
        if self.decay_steps:
            span, named = self.decay_steps, f"optimizer.decay_steps={self.decay_steps}"
        else:
            span, named = total_steps - self.schedule_start, f"train.steps={total_steps}"
            if self.schedule_start:
                named += f" less optimizer.schedule_start={self.schedule_start}"
        if self.warmup_steps >= span:
            raise UserError(f"optimizer.warmup_steps={self.warmup_steps} must be smaller than "
                            f"{named}")
        return span


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    seed: int = 0
    grad_accum: int = 1  # micro-batches per step, accumulated inside the compiled step
    # With mesh.stage > 1: the pipeline micro-batches each of those is cut into (0: one per
    # stage), and the rounds through the stages (1 is GPipe, more the circular schedule).
    microbatches: int = 0
    pipeline_repeats: int = 1
    log_every: int = 25
    eval_every: int = 100  # 0: only at the end
    eval_batches: int = 4
    run_dir: str = "runs/default"
    peak_tflops: float = 0.0  # per device, for MFU; 0: from the known accelerators
    profile_steps: tuple[int, ...] = ()  # [first, last]: a jax.profiler trace of those steps
    sample_prompts: tuple[str, ...] = ("def ", "The ")  # continued at each evaluation
    sample_tokens: int = 48  # new tokens per sample; 0: no samples
    sample_temperature: float = 0.8  # 0: greedy (a small model greedily repeats itself)
    sample_top_p: float = 0.95  # nucleus; the samples' random seed is train.seed
    resume: bool = True  # continue from the run directory's latest checkpoint
    init_from: str = ""  # a run directory (imported or trained): start from its parameters
    max_bad_steps: int = 0  # steps with a non-finite loss to skip before stopping
    # With mesh.context > 1: reorder each sequence so that every context shard holds one early
    # and one late chunk, which evens out the causal attention work between them.
    context_load_balance: bool = True
    wandb_project: str = ""  # also log to this Weights & Biases project (extra `wandb`)
    wandb_mode: Literal["auto", "online", "offline"] = "auto"  # auto: WANDB_MODE, else online

    def validate(self) -> None:
        require_positive(self, "train", "steps", "grad_accum", "log_every", "eval_batches",
                         "pipeline_repeats")
        for name in ("microbatches", "eval_every", "max_bad_steps", "peak_tflops", "sample_tokens",
                     "sample_temperature"):
            if getattr(self, name) < 0:
                raise UserError(f"train.{name} must be >= 0")
        if not 0 < self.sample_top_p <= 1:
            raise UserError(f"train.sample_top_p={self.sample_top_p} must lie in (0, 1]; "
                            "1 samples from all tokens")
        if not self.run_dir:
            raise UserError("train.run_dir must not be empty")
        if self.profile_steps and (len(self.profile_steps) != 2 or
                                   not 1 <= self.profile_steps[0] <= self.profile_steps[1]):
            raise UserError(f"train.profile_steps={list(self.profile_steps)} must be [first, last] "
                            "with 1 <= first <= last")


@dataclass(frozen=True)
class CheckpointConfig:
    directory: str = ""  # "" is <train.run_dir>/checkpoints
    every: int = 100  # save every N steps (and always at the end); 0: only at the end
    keep: int = 3  # the newest K checkpoints are kept
    keep_every: int = 0  # and every M-th step besides (0: none)
    async_save: bool = True  # write in the background while training goes on

    def validate(self) -> None:
        require_positive(self, "checkpoint", "keep")
        for name in ("every", "keep_every"):
            if getattr(self, name) < 0:
                raise UserError(f"checkpoint.{name} must be >= 0")


@dataclass(frozen=True)
class Config:
    model: DecoderConfig = field(default_factory=family("llama").config)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def validate(self) -> None:
        for section in (self.model, self.mesh, self.data, self.optimizer, self.train,
                        self.checkpoint, self.distributed):
            section.validate()
        if self.data.seq_len > self.model.max_len:
            raise UserError(f"data.seq_len={self.data.seq_len} exceeds model.max_len="
                            f"{self.model.max_len}; shorten the sequences or raise max_len")
        if self.model.loss_chunk and self.data.seq_len % self.model.loss_chunk:
            raise UserError(f"model.loss_chunk={self.model.loss_chunk} must divide data.seq_len="
                            f"{self.data.seq_len}")
        self.optimizer.span(self.train.steps)
        if self.data.batch_size % self.train.grad_accum:
            raise UserError(f"train.grad_accum={self.train.grad_accum} must divide "
                            f"data.batch_size={self.data.batch_size}")

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return [_plain(v) for v in x]
    return x


# ---------------------------------------------------------------- loading


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML file (or the built-in defaults), apply `a.b=value` overrides, validate."""
    raw = _read_yaml(path) if path else {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not of the form key.sub=value")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        _set_dotted(raw, key.strip(), value)
    cfg = _build(Config, raw, "")
    cfg.validate()
    return cfg


def config_from_dict(raw: dict) -> Config:
    """A whole config from its plain form (`Config.to_dict()`, as runs and checkpoints save
    it), validated."""
    cfg = _build(Config, raw, "")
    cfg.validate()
    return cfg


def load_section(cls, path: str, name: str):
    """One section of the tree (e.g. DecoderConfig) from a YAML file holding just that mapping,
    checked like a whole config; `name` is its key in messages (model.num_layers=...)."""
    section = _build(cls, _read_yaml(path), name + ".")
    section.validate()
    return section


def _read_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist; see configs/ for examples") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise UserError(f"config file {path} is not valid YAML{line}; fix its syntax") from None
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must hold a mapping of sections (model:, mesh:, ...)")
    return raw


def _set_dotted(raw: dict, key: str, value) -> None:
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"override {key!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls, raw, prefix: str):
    if not isinstance(raw, dict):
        raise UserError(f"config section {prefix.rstrip('.') or 'root'} must be a mapping, "
                        f"got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            raise UserError(f"unknown config key {prefix}{key}{hint}")
    values = {}
    for name in names:
        if name not in raw:
            continue
        hint = hints[name]
        key = prefix + name
        if hint is DecoderConfig:  # the family's own class, for its own keys
            values[name] = _build(config_class(raw[name]), raw[name], key + ".")
        elif dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw[name], key + ".")
        else:
            values[name] = _coerce(raw[name], hint, key)
    return cls(**values)


def _coerce(value, hint, key: str):
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise UserError(f"{key}={value!r} is not one of: {', '.join(map(str, choices))}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{key} must be a string, got {value!r}")
    if hint == tuple[int, ...]:
        if value is None:
            return ()
        items = value if isinstance(value, list) else [value]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            return tuple(items)
        raise UserError(f"{key} must be an integer or a list of integers; got {value!r}")
    if hint == tuple[str, ...]:
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise UserError(f"{key} must be a string, a list of strings, or null; got {value!r}")
    if typing.get_origin(hint) is tuple and dataclasses.is_dataclass(typing.get_args(hint)[0]):
        if value is None:
            return ()
        if not isinstance(value, list):
            raise UserError(f"{key} must be a list of mappings, got {value!r}")
        return tuple(_build(typing.get_args(hint)[0], item, f"{key}[{i}].")
                     for i, item in enumerate(value))
    raise TypeError(f"unsupported config type {hint} for {key}")
