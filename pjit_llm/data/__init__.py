"""Input data: tokenizer, built-in corpus, packing into fixed-length rows, global batches."""
