"""Input data: tokenizer, built-in corpus, packing into fixed-length rows, global batches.

The modules form a one-way stack, each importing only modules above it in this list:
tokenizer; chat (templates, loss masks); records (local files); builtin; sources (prepared
TFDS sources); pipeline (Grain: tokenize, pack, batch); mixture (weighted sources); datasets
(the configured dataset, a source or a mixture); loader (global batches).
"""
