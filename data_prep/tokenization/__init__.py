"""The tokenization run (``mesh data tokenize``): the run itself (``run``), its deterministic
chunk plan (``plan``), the worker-side encode (``encode``), the train/val/test assignment
(``splits``), the resume state on disk (``progress_file``), the progress bar (``progress_bar``)
and the fault-injection hooks of the resume tests (``faults``)."""
