"""Data preparation: sources, named corpora, tokenizers, token shards and batch loading."""
