"""`mesh analyze`: the MeSH paper's diagnostics (computation skew, loop stagnation, representational
collapse, router statistics) on any checkpoint, in one CPU process without DeepSpeed
(docs/diagnostics.md). One module per concern: checkpoint.py (load into a world-size-1 model),
heldout.py (sequences from a data prefix), states.py (capture every hidden state), skew.py, cka.py,
spectrum.py, routers.py, plots.py, report.py (the whole analysis), cli.py."""
