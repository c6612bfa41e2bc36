"""What data preparation writes and how it is read back: megatron-core ``.bin``/``.idx`` shards
(``megatron_shards``), Pile-style ``.jsonl.zst`` files (``jsonl_zst``), the manifest schema
(``manifest``), data prefixes resolved to shards for training (``data_prefixes``), output group
names (``groups``), ``mesh data inspect`` (``inspect_output``) and atomic JSON files
(``atomic_json``)."""
