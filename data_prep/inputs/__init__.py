"""Reading inputs: which files and datasets to read (``discovery``), cutting one input into
chunks of raw records while streaming (``chunk_readers``), turning one record into a document or
a skip reason (``records``), counting what was skipped (``skips``), and reading documents one by
one in a single process (``document_reader``, for tokenizer training)."""
