"""Data preparation (``mesh data ...``): inputs -> tokenized megatron-core shards with a manifest.

Subpackages by role: ``inputs`` (what to read and how), ``tokenization`` (the parallel,
resumable tokenize run) and ``outputs`` (shard and manifest formats, inspection). Top level:
the CLI, the tokenizer interface and its training, the demo corpus and demo preparation,
user-facing errors and the one-line step reports. See docs/data_prep.md.
"""
