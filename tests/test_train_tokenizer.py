"""The tokenizer command (`python -m pjit_llm.train_tokenizer`) in this process. (In a real
process: e2e/test_tokenizer_cli.py.)"""

import json

from pjit_llm.data.tokenizer import SentencePieceTokenizer
from pjit_llm.train_tokenizer import main


def test_tokenizer_command_reads_a_local_jsonl_by_its_configured_field(tmp_path, capsys):
    """Prepared local corpora store the text as `text`, whatever field the JSONL used; --out
    may name a directory that does not exist yet."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"content": f"The {w} sat on mat {i}.", "id": i}) + "\n"
                              for i, w in enumerate(["cat", "dog", "bird", "fish"] * 50)))
    main(["train", "--vocab-size", "300", "--out", str(tmp_path / "models/code.model"),
          "data.source=local", "data.text_field=content", f"data.paths=[{corpus}]",
          f"data.data_dir={tmp_path / 'data'}"])
    model = tmp_path / "models/code.model"
    assert f"wrote {model} (" in capsys.readouterr().out
    tok = SentencePieceTokenizer(str(model))
    assert tok.decode(tok.encode("The cat sat on mat 7.")) == "The cat sat on mat 7."
