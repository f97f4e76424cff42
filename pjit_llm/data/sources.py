"""Datasets as TFDS array_record sources: the built-in corpus, local files, the TFDS catalogue.

Local corpora (and the built-in one) go through `TextCorpus`, a TFDS builder of ours that
writes `train` and `validation` splits of raw text once per set of input files and reuses
them. TFDS prepares into a temporary directory and renames it when complete, so a failed
preparation leaves nothing behind. Reading needs no TensorFlow: `as_data_source` gives
random access for Grain.
"""

import functools
import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pjit_llm.config import DataConfig
from pjit_llm.data import builtin
from pjit_llm.data.records import ReadReport, expand_paths, is_validation, read_records
from pjit_llm.errors import UserError, first_line

CORPUS_VERSION = "1.0.0"


@dataclass
class Dataset:
    train: Any  # random-access sources: len() and [i] -> {feature: bytes}
    val: Any
    directory: Path  # the prepared data; a trained SentencePiece model is kept here
    text_field: str  # the feature of train/val records holding the text (`text` for local corpora)


def prepare(cfg: DataConfig) -> Dataset:
    """The configured single source, prepared on first use (datasets.prepare also takes a
    data.mixture of them)."""
    if cfg.mixture:
        raise ValueError("sources.prepare prepares one source; datasets.prepare takes a mixture")
    _quiet_tfds()
    if cfg.source == "tfds":
        return _catalogue(cfg)
    files = builtin.files() if cfg.source == "builtin" else expand_paths(cfg.paths)
    field = cfg.text_field if cfg.source == "local" else "text"
    return _corpus(files, field, cfg)


def read_texts(source, field: str):
    """Every record's text, in order (for training a tokenizer)."""
    for i in range(len(source)):
        yield _text(source[i], field)


def _text(record, field: str) -> str:
    value = record[field]
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _tfds():
    import tensorflow_datasets as tfds
    return tfds


def _quiet_tfds() -> None:
    _tfds().disable_progress_bar()
    logging.getLogger("absl").setLevel(logging.ERROR)


def _fingerprint(files, field: str, fraction: float, fmt: str = "text") -> str:
    stats = [(key, p.stat().st_size, p.stat().st_mtime_ns) for key, p in files]
    # Text corpora keep the fingerprint they had before formats existed.
    blob = json.dumps([stats, field, fraction, CORPUS_VERSION] + ([fmt] if fmt != "text" else [])
                      ).encode()
    return "c" + hashlib.sha256(blob).hexdigest()[:16]


def _corpus(files, field: str, cfg: DataConfig) -> Dataset:
    builder = _corpus_builder_class()(
        files=files, field=field, val_fraction=cfg.val_fraction, fmt=cfg.format,
        data_dir=cfg.data_dir or None, file_format="array_record",
        config=_tfds().core.BuilderConfig(name=_fingerprint(files, field, cfg.val_fraction,
                                                            cfg.format)))
    builder.download_and_prepare()
    return Dataset(builder.as_data_source(split="train"), builder.as_data_source(split="validation"),
                   Path(builder.data_dir), "text")


@functools.cache
def _corpus_builder_class():
    """Defined on first use so that importing this module does not import TFDS."""
    tfds = _tfds()

    class TextCorpus(tfds.core.GeneratorBasedBuilder):
        """Raw text records of local files, split into train and validation by record key."""

        VERSION = tfds.core.Version(CORPUS_VERSION)
        code_path = None  # no checksums file or dataset package of ours to look up

        def __init__(self, *, files=(), field: str = "text", val_fraction: float = 0.0,
                     fmt: str = "text", **kwargs):
            # Only preparing needs the files; a copy unpickled in a Grain worker just reads.
            self._files, self._field, self._val_fraction = files, field, val_fraction
            self._fmt = fmt  # chat and prompt_completion records are stored as JSON text
            _quiet_tfds()  # also in worker processes, which build their own copy
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(False),
                    "validation": self._generate_examples(True)}

        def _generate_examples(self, validation: bool):
            report = ReadReport()
            kept = 0
            records = read_records(self._files, self._field, report, self._fmt)
            for index, (key, text) in enumerate(records):
                if is_validation(index, self._val_fraction) == validation:
                    kept += 1
                    yield key, {"text": text}
            if not kept:
                split = "validation" if validation else "train"
                raise UserError(
                    f"the corpus gives no {split} records ({len(self._files)} files"
                    + (f"; {report.describe()}" if report else "")
                    + "); add text" + (" or raise data.val_fraction" if validation else ""))
            if not validation and report:
                print(f"warning: {report.describe()}", file=sys.stderr)

    TextCorpus.__module__, TextCorpus.__qualname__ = __name__, "TextCorpus"
    TextCorpus.name = "text_corpus"
    return TextCorpus


def __getattr__(name: str):
    """`pjit_llm.data.sources.TextCorpus`, for pickle in Grain's worker processes."""
    if name == "TextCorpus":
        return _corpus_builder_class()
    raise AttributeError(name)


def _catalogue(cfg: DataConfig) -> Dataset:
    tfds = _tfds()
    try:
        builder = tfds.builder(cfg.name, data_dir=cfg.data_dir or None, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(f"data.name={cfg.name!r} is not in the TFDS catalogue; see "
                        "https://www.tensorflow.org/datasets/catalog") from None
    if not _is_prepared(builder):
        if not cfg.download:
            raise UserError(f"TFDS dataset {cfg.name} is not prepared in {builder.data_dir}; "
                            "set data.download=true or data.data_dir to where it is")
        try:
            builder.download_and_prepare()
        except Exception as e:  # network, missing manual download, TensorFlow-only builders
            first = first_line(e, limit=1000)
            raise UserError(f"could not prepare TFDS dataset {cfg.name}: {first}") from None
    splits = builder.info.splits
    for split in filter(None, (cfg.train_split, cfg.val_split)):
        if splits and split not in splits:
            raise UserError(f"TFDS dataset {cfg.name} has no split {split!r}; it has "
                            f"{', '.join(sorted(splits))}")
    features = builder.info.features
    if cfg.text_field not in features:
        raise UserError(f"TFDS dataset {cfg.name} has no feature {cfg.text_field!r}; set "
                        f"data.text_field to one of {', '.join(sorted(features))}")
    train_split, val_split = cfg.train_split, cfg.val_split
    if not val_split:  # carve the first records of the training split, deterministically
        n = len(builder.as_data_source(split=train_split))
        k = max(1, round(n * cfg.val_fraction))
        if k >= n:
            raise UserError(f"split {train_split} of {cfg.name} has {n} records, too few to "
                            "hold some out; set data.val_split")
        train_split, val_split = f"{train_split}[{k}:]", f"{train_split}[:{k}]"
    return Dataset(builder.as_data_source(split=train_split), builder.as_data_source(split=val_split),
                   Path(builder.data_dir), cfg.text_field)


def _is_prepared(builder) -> bool:
    try:
        return builder.is_prepared()
    except AttributeError:  # older TFDS
        return Path(builder.data_dir, "dataset_info.json").exists()
