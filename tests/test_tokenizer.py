"""Byte, SentencePiece and Hugging Face tokenizers. (SentencePiece models trained by the
command: test_train_tokenizer.py, and in a real process e2e/test_tokenizer_cli.py.)"""

import pickle

import numpy as np
import pytest

from pjit_llm.data.tokenizer import (ByteTokenizer, HFTokenizer, SentencePieceTokenizer,
                                     load_tokenizer)
from pjit_llm.errors import UserError

TEXT = "def f(x):\n    return x ** 2  # naïve — ok 🙂\n"


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids.dtype == np.int32 and ids.max() < 256 and len(ids) == len(TEXT.encode())
    assert tok.decode(list(ids) + [tok.eos_id]) == TEXT


def test_hugging_face_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator([TEXT * 20, "hello world " * 50],
                           trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    tok = load_tokenizer("hf", str(path), None)
    assert isinstance(tok, HFTokenizer) and tok.eos_id == 0 and tok.vocab_size <= 300
    assert tok.decode(tok.encode(TEXT)) == TEXT
    clone = pickle.loads(pickle.dumps(tok))
    np.testing.assert_array_equal(clone.encode(TEXT), tok.encode(TEXT))


def test_tokenizer_files_that_do_not_load(tmp_path):
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x00not a model")
    with pytest.raises(UserError, match="is not a SentencePiece model"):
        SentencePieceTokenizer(str(junk))
    with pytest.raises(UserError, match="is not a Hugging Face tokenizer.json"):
        HFTokenizer(str(junk))
    with pytest.raises(UserError, match="does not exist; train one with `python -m pjit_llm.train_tokenizer train`"):
        load_tokenizer("sentencepiece", "", tmp_path)
    with pytest.raises(UserError, match="tokenizer file .* does not exist"):
        HFTokenizer(str(tmp_path / "missing.json"))
