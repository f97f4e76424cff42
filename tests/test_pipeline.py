"""The Grain pipeline: packing loses and duplicates no token, first-fit keeps documents
whole, processes read disjoint shares that cover the data."""

import numpy as np
import pytest

from pjit_llm.config import DataConfig
from pjit_llm.data.pipeline import packed_batches
from pjit_llm.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def docs_source(n=60, seed=0):
    """Documents of varied length whose bytes say which document they are."""
    rng = np.random.default_rng(seed)
    return [{"text": f"<{i}>" + "abcdefgh"[i % 8] * int(rng.integers(1, 90))} for i in range(n)]


def collect(ds) -> list[dict]:
    return [{k: np.asarray(v) for k, v in b.items()} for b in ds]


def segments(batches) -> list[np.ndarray]:
    """Every (row, segment) piece of tokens, in order."""
    out = []
    for b in batches:
        for tok, seg in zip(b["tokens"], b["segment_ids"]):
            for s in range(1, seg.max() + 1):
                out.append(tok[seg == s])
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_concat_packing_loses_and_duplicates_nothing(workers):
    source = docs_source()
    cfg = DataConfig(seq_len=16, num_workers=workers)
    batches = collect(packed_batches(source, TOK, "text", cfg, 4, 0, 1, train=False))
    stream = np.concatenate([np.append(TOK.encode(r["text"]), np.int32(TOK.eos_id)) for r in source])
    if workers:  # each worker packs its own share of the records
        stream = np.concatenate([np.append(TOK.encode(source[i]["text"]), np.int32(TOK.eos_id))
                                 for w in range(workers) for i in range(w, len(source), workers)])
    got = []
    for b in batches:
        assert b["tokens"].shape[1] == 16 and b["tokens"].dtype == np.int32
        for tok, seg, pos in zip(b["tokens"], b["segment_ids"], b["positions"]):
            got.append(tok[seg > 0])
            for s in range(1, seg.max() + 1):  # positions count 0, 1, ... inside each piece
                np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
            assert (np.diff(seg[seg > 0]) >= 0).all() and seg[0] == 1
    assert sorted(np.concatenate(got).tolist()) == sorted(stream.tolist())
    if not workers:
        np.testing.assert_array_equal(np.concatenate(got), stream)


def test_first_fit_packing_keeps_documents_whole_or_truncated():
    source = docs_source()
    cfg = DataConfig(seq_len=48, packing="first_fit")
    pieces = segments(collect(packed_batches(source, TOK, "text", cfg, 4, 0, 1, train=False)))
    expected = [np.append(TOK.encode(r["text"]), np.int32(TOK.eos_id))[:48] for r in source]
    assert sorted(p.tobytes() for p in pieces) == sorted(e.tobytes() for e in expected)


def test_processes_read_disjoint_shares_that_cover_the_data():
    source = docs_source(61)
    cfg = DataConfig(seq_len=64, packing="first_fit")
    seen = []
    for pid in range(2):
        pieces = segments(collect(packed_batches(source, TOK, "text", cfg, 2, pid, 2, train=False)))
        seen.append({TOK.decode(p).split(">")[0] for p in pieces})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {f"<{i}" for i in range(61)}



@pytest.mark.parametrize("workers", [0, 2])
def test_chat_records_pack_whole_with_their_loss_mask_and_truncation_flags(tmp_path, workers):
    from hf_models import chat_tokenizer
    from pjit_llm.data.chat import Encode, load_chat_template, to_record
    from pjit_llm.data.tokenizer import HFTokenizer

    tok = HFTokenizer(str(chat_tokenizer(tmp_path / "tok")))
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran"]
    rng = np.random.default_rng(0)
    source = [{"text": to_record({"messages": [
        {"role": "user", "content": " ".join(rng.choice(words, rng.integers(1, 12)))},
        {"role": "assistant", "content": " ".join(rng.choice(words, rng.integers(1, 12)))}]},
        "chat")[0].encode()} for _ in range(40)]
    cfg = DataConfig(source="local", paths=("x.jsonl",), format="chat", tokenizer="hf",
                     tokenizer_path=tok.path, seq_len=20, num_workers=workers)  # packing: concat
    batches = collect(packed_batches(source, tok, "text", cfg, 4, 0, 1, train=False))
    encode = Encode(tok, "chat", 20, load_chat_template(tok.path))
    expected = sorted((tuple(e["tokens"]), tuple(e["loss_mask"]), int(e["truncated"].sum()))
                      for e in map(encode, source))
    got = []
    for b in batches:
        assert set(b) == {"tokens", "segment_ids", "positions", "loss_mask", "truncated"}
        for row in range(len(b["tokens"])):
            seg = b["segment_ids"][row]
            for s in range(1, seg.max() + 1):
                got.append((tuple(b["tokens"][row][seg == s]), tuple(b["loss_mask"][row][seg == s]),
                            int(b["truncated"][row][seg == s].sum())))
    # Every conversation in one piece (first-fit even though packing says concat), its mask
    # alongside; those longer than a row cut to it and flagged.
    assert sorted(got) == expected
    assert 0 < sum(t for *_, t in got) < len(source)
