#!/usr/bin/env bash
# The small-scale replication of the MeSH paper's comparison (docs/replication.md), end to end with
# the project's own commands:
#   1. the corpus: this Python's standard library + the Python documentation's reStructuredText
#      sources (Debian's python3.11-doc), held-out validation documents, a 4,096-piece tokenizer;
#   2. configs/sweeps/replication.yaml (2 widths x 6 variants, 3 seeds each) and then
#      configs/sweeps/replication-ablations.yaml as SLURM job arrays on the local cluster;
#   3. mesh sweep collect / fit, mesh analyze --compare (base vs MeSH, d=256), the best MeSH run
#      converted with mesh convert hf, loaded in transformers, a greedy sample, mesh eval ppl;
#      everything it reports lands in docs/replication/ (CSV, JSON, PNG), then the tables.
#
# Resumable: run it again after any interruption. Finished steps are skipped, a sweep resubmits only
# its runs without a COMPLETE marker, and those resume from their last checkpoint.
# Needs root for the local SLURM cluster and apt (slurm/local_cluster.sh), and the project installed
# (`pip install -e .`, README). About 2 h 10 min on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=data/replication
OUT=docs/replication
SWEEPS=(configs/sweeps/replication.yaml configs/sweeps/replication-ablations.yaml)
say() { echo "replicate: $*" >&2; }

# --- 1. data --------------------------------------------------------------------------------
DOCS_DIR=/usr/share/doc/python3.11/html/_sources
if [ ! -d "$DOCS_DIR" ]; then
  say "installing python3.11-doc (the Python documentation sources)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3.11-doc >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3.11-doc >/dev/null; }
fi
[ -f "$DATA/corpus/corpus.json" ] || mesh data demo-corpus --out "$DATA/corpus" --max-bytes 20000000 \
  --valid-fraction 0.05 --docs-dir "$DOCS_DIR"
[ -f "$DATA/tokenizer.model" ] || mesh data train-tokenizer --input "$DATA/corpus/train.jsonl.zst" \
  --out "$DATA/tokenizer" --vocab-size 4096
[ -f "$DATA/text.manifest.json" ] || mesh data tokenize --input "$DATA/corpus/train.jsonl.zst" \
  --val-input "$DATA/corpus/val.jsonl.zst" --tokenizer "$DATA/tokenizer.model" --out "$DATA/text" --no-progress
mkdir -p "$OUT"
cp "$DATA/text.manifest.json" "$OUT/data_manifest.json"
cp "$DATA/corpus/corpus.json" "$OUT/corpus.json"

# --- 2. the sweeps on the local SLURM cluster ------------------------------------------------
bash slurm/local_cluster.sh up
for sweep in "${SWEEPS[@]}"; do
  mesh sweep submit "$sweep"
done
say "waiting for the sweeps' array tasks (mesh sweep status configs/sweeps/replication.yaml follows them)"
start=$(date +%s)
while [ -n "$(squeue -h -o %i 2>/dev/null)" ]; do
  sleep 60
  done_runs=$(ls runs/sweeps/replication*/*/COMPLETE 2>/dev/null | wc -l)
  say "$(( ($(date +%s) - start) / 60 )) min: $done_runs of 45 runs complete, $(squeue -h -t R -o %i | wc -l) running"
done

# --- 3. results ------------------------------------------------------------------------------
python scripts/replication_results.py --out "$OUT"
say "done: $OUT (docs/replication.md explains each file)"
