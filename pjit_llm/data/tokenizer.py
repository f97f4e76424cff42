"""Byte-level tokenizer: ids 0-255 are the UTF-8 bytes, 256 ends a document."""

import numpy as np


class ByteTokenizer:
    vocab_size = 257
    eos_id = 256

    def encode(self, data: str | bytes) -> np.ndarray:
        raw = data.encode("utf-8") if isinstance(data, str) else data
        return np.frombuffer(raw, dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")
