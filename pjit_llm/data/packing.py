"""Pack token documents into fixed-length rows with segment ids and positions.

Documents are laid end to end and cut into rows of `seq_len`. In each row, segment ids
number the document pieces from 1 (0 marks padding in the last row) and positions count from
0 at the start of each piece, so attention and rotary positions never cross a document.
"""

import numpy as np


def pack(docs: list[np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    stream = np.concatenate(docs).astype(np.int32) if docs else np.zeros(0, np.int32)
    n = len(stream)
    rows = -(-n // seq_len)
    pad = rows * seq_len - n
    doc_id = np.repeat(np.arange(len(docs)), lengths)
    doc_start = np.repeat(np.cumsum(lengths) - lengths, lengths)
    index = np.arange(rows * seq_len).reshape(rows, seq_len)
    doc_id = np.concatenate([doc_id, np.full(pad, -1)]).reshape(rows, seq_len)
    piece_start = np.maximum(np.concatenate([doc_start, np.full(pad, n)]).reshape(rows, seq_len),
                             index[:, :1])
    real = doc_id >= 0
    return {
        "tokens": np.concatenate([stream, np.zeros(pad, np.int32)]).reshape(rows, seq_len),
        "segment_ids": np.where(real, doc_id - doc_id[:, :1] + 1, 0).astype(np.int32),
        "positions": np.where(real, index - piece_start, 0).astype(np.int32),
    }
