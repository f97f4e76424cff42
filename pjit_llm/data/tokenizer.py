"""Tokenizers: byte-level (default), SentencePiece and Hugging Face `tokenizer.json`.

All three are picklable (Grain ships them to worker processes): the file-backed ones load
lazily in whichever process first uses them. `train_sentencepiece` trains a SentencePiece
model (the command is `python -m pjit_llm.train_tokenizer train ...`).
"""

import io
import os
from pathlib import Path

import numpy as np

from pjit_llm.errors import UserError

SENTENCEPIECE_FILE = "sentencepiece.model"
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[SEP]")


class ByteTokenizer:
    """ids 0-255 are the UTF-8 bytes, 256 ends a document."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str | bytes) -> np.ndarray:
        raw = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(raw, dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class _FileTokenizer:
    def __init__(self, path: str):
        self.path = path
        self._impl = None
        self._load()  # fail now, in the parent, if the file is bad

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.path, self._impl = state["path"], None

    @property
    def impl(self):
        if self._impl is None:
            self._load()
        return self._impl


class SentencePieceTokenizer(_FileTokenizer):
    def _load(self):
        import sentencepiece as spm
        if not os.path.isfile(self.path):
            raise UserError(f"SentencePiece model {self.path} does not exist; train one with "
                            "`python -m pjit_llm.train_tokenizer train` or set data.tokenizer_path")
        try:
            self._impl = spm.SentencePieceProcessor(model_file=self.path)
        except (RuntimeError, OSError):
            raise UserError(f"{self.path} is not a SentencePiece model; point "
                            "data.tokenizer_path at a .model file") from None

    @property
    def vocab_size(self) -> int:
        return self.impl.vocab_size()

    @property
    def eos_id(self) -> int | None:
        eos = self.impl.eos_id()
        return eos if eos >= 0 else None

    def encode(self, text: str | bytes) -> np.ndarray:
        text = text.decode("utf-8") if isinstance(text, bytes) else text
        return np.asarray(self.impl.encode(text), dtype=np.int32)

    def decode(self, ids) -> str:
        return self.impl.decode([int(i) for i in ids])


class HFTokenizer(_FileTokenizer):
    def _load(self):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UserError("data.tokenizer=hf needs the `tokenizers` package: "
                            "pip install tokenizers") from None
        if not os.path.isfile(self.path):
            raise UserError(f"tokenizer file {self.path} does not exist; set data.tokenizer_path "
                            "to a Hugging Face tokenizer.json")
        try:
            self._impl = Tokenizer.from_file(self.path)
        except Exception:  # the library raises a bare Exception for unparsable files
            raise UserError(f"{self.path} is not a Hugging Face tokenizer.json; point "
                            "data.tokenizer_path at one") from None

    @property
    def vocab_size(self) -> int:
        return self.impl.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int | None:
        for name in _EOS_NAMES:
            if (i := self.impl.token_to_id(name)) is not None:
                return i
        return None

    def encode(self, text: str | bytes) -> np.ndarray:
        text = text.decode("utf-8") if isinstance(text, bytes) else text
        return np.asarray(self.impl.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, [n, 2] character offsets of each token in `text`)."""
        encoding = self.impl.encode(text, add_special_tokens=False)
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        return np.asarray(encoding.ids, dtype=np.int32), offsets

    def decode(self, ids) -> str:
        return self.impl.decode([int(i) for i in ids])


Tokenizer = ByteTokenizer | SentencePieceTokenizer | HFTokenizer


def load_tokenizer(kind: str, path: str, dataset_dir: Path | None) -> Tokenizer:
    """The configured tokenizer; SentencePiece defaults to the model beside the dataset."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        return HFTokenizer(path)
    if not path and dataset_dir is None:
        raise UserError("data.tokenizer=sentencepiece needs data.tokenizer_path")
    return SentencePieceTokenizer(path or str(dataset_dir / SENTENCEPIECE_FILE))


def train_sentencepiece(texts, out: Path, vocab_size: int, model_type: str = "bpe",
                        max_texts: int = 200_000) -> Path:
    """Train on an iterable of strings; writes `out` only once the model is complete."""
    import sentencepiece as spm

    def sentences():  # SentencePiece learns from sentence-sized pieces: one per line
        for i, text in enumerate(texts):
            if i >= max_texts:
                return
            yield from (line for line in text.splitlines() if line.strip())

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, byte_fallback=True, character_coverage=0.9995,
            max_sentence_length=1 << 16, split_digits=True, remove_extra_whitespaces=False,
            normalization_rule_name="identity", hard_vocab_limit=False,
            pad_id=-1, unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    except RuntimeError as e:
        raise UserError(f"SentencePiece training failed: {str(e).splitlines()[-1]}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(out)
    return out
