"""The tokenizer command in a real process: a SentencePiece model trained beside the data
round-trips text and survives pickling (as Grain ships it to worker processes)."""

import pickle

import numpy as np

from conftest import run_module
from pjit_llm.data.tokenizer import SENTENCEPIECE_FILE, load_tokenizer

TEXT = "def f(x):\n    return x ** 2  # naïve — ok 🙂\n"


def test_sentencepiece_trained_by_the_command_round_trips(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"The {w} sat on the mat number {i}.\n"
                              for i, w in enumerate(["cat", "dog", "bird", "fish"] * 300)))
    result = run_module("pjit_llm.train_tokenizer", "train", "--vocab-size", "400",
                        "data.source=local", f"data.paths=[{corpus}]",
                        f"data.data_dir={tmp_path / 'data'}")
    assert result.returncode == 0, result.stderr
    model = next((tmp_path / "data").rglob(SENTENCEPIECE_FILE))
    assert f"wrote {model}" in result.stdout
    tok = load_tokenizer("sentencepiece", "", model.parent)  # found beside the data
    assert 259 < tok.vocab_size <= 400 and tok.eos_id is not None
    for text in (TEXT, "The cat sat on the mat number 7.", "  spaces\tand\ttabs  \n"):
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("The cat sat on the mat.")) < len("The cat sat on the mat.") / 2
    clone = pickle.loads(pickle.dumps(tok))  # as Grain ships it to a worker
    np.testing.assert_array_equal(clone.encode(TEXT), tok.encode(TEXT))
