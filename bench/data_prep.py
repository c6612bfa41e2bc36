"""Tokenization throughput: `mesh data tokenize` vs a per-document loop vs the raw tokenizer.

    python bench/data_prep.py                  # about 15 minutes on 2 idle cores
    python bench/data_prep.py --repeats 1 --copies 1 --max-bytes 2000000   # a quick look

The same input, side by side in one run, at 1 and 2 workers:

* tool      data_prep.tokenization.run.tokenize_corpus (read .jsonl.zst, parse, batch
            encode, EOD, write .bin/.idx and the manifest), ``--workers W``;
* per-doc   the way common preprocessing scripts work: read the file line by
            line, ``json.loads`` each, ``tokenizer.encode`` one document at a
            time (in a pool of W processes with ``imap`` when W > 1) and write
            with megatron-core's ``IndexedDatasetBuilder.add_item``;
* ceiling   the tokenizer's own batch encoder on the texts already in memory
            (W threads), in batches of ~1 MB of text: no reading, parsing
            or writing.

Both tokenizers of the tool: a sentencepiece BPE model and a byte-level BPE
``tokenizer.json`` (the GPT-NeoX-20B kind), both trained here on the corpus
(vocabulary 8192). Two corpora with the same text: the stdlib demo corpus
(one document per module, ~13 kB each; all of this machine's stdlib, ~10 MB,
written ``--copies`` times so that worker start-up, ~0.2 s per worker, does
not dominate) and the same text re-cut into documents with a Pile-like size
distribution (log-normal, median 1.5 kB, mean ~3.8 kB), where per-document
overheads weigh more.

Runs are interleaved (every configuration once per repeat) so machine noise
hits them alike. On a shared machine other processes steal cores, which
ruins any 2-worker number on 2 cores: before each run the script waits (up
to ``--quiet-wait`` seconds) until the CPUs are idle, and it measures how much
CPU other processes used during the run (/proc/stat minus our own process
tree). The table reports, per configuration, the fastest run; the JSON keeps
every run with its "other load" (cores used by others, on average) and the
medians. Each run is a fresh process, as a real run is (a long-lived
benchmark process's heap slowed single-threaded tokenizers runs erratically
by up to 40%); its imports (torch, megatron-core) and, for the ceiling, the
loading of the texts happen before its clock starts. Worker start-up is
inside the clock. Each run's output is checked: the tool
and the per-document loop must write byte-identical .bin files.
Results go to bench/results/data_prep-<date>.json and a markdown table on
stdout; ``--update-docs`` also puts the table into docs/data_prep.md.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy  # noqa: E402

from data_prep import demo_corpus  # noqa: E402
from data_prep.inputs.document_reader import iter_documents  # noqa: E402
from data_prep.outputs.jsonl_zst import JsonlZstWriter, pile_record  # noqa: E402
from data_prep.tokenization.run import TokenizeOptions, tokenize_corpus  # noqa: E402
from data_prep.tokenizer import Tokenizer, load_tokenizer  # noqa: E402
from data_prep.train_tokenizer import train_sentencepiece  # noqa: E402

WORKERS = (1, 2)
VOCAB = 8192
DOCS_MARKERS = ("<!-- bench:data_prep -->", "<!-- /bench:data_prep -->")


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------


def pile_like(texts: list[str], seed: int = 0) -> list[str]:
    """The same text cut into documents of Pile-like sizes (paragraph boundaries)."""
    rng = random.Random(seed)
    paragraphs = [p for text in texts for p in text.split("\n\n") if p.strip()]
    docs, current, target = [], [], 0
    for paragraph in paragraphs:
        if not current:
            target = rng.lognormvariate(math.log(1500), 1.3)
        current.append(paragraph)
        if sum(len(p) for p in current) >= target:
            docs.append("\n\n".join(current))
            current = []
    if current:
        docs.append("\n\n".join(current))
    return docs


def write_corpus(path: Path, texts: list[str]) -> None:
    with JsonlZstWriter(path) as out:
        for text in texts:
            out.write(pile_record(text, "Bench"))


def hf_tokenizer(texts: list[str], path: Path) -> None:
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(path))


# --------------------------------------------------------------------------
# The per-document baseline
# --------------------------------------------------------------------------

_baseline_tokenizer: Tokenizer | None = None


def _baseline_init(path: str) -> None:
    global _baseline_tokenizer
    _baseline_tokenizer = load_tokenizer(path)


def _baseline_encode(line: str):
    try:
        text = json.loads(line)["text"]
    except (ValueError, KeyError, TypeError):
        return None
    if not text:
        return None
    ids = _baseline_tokenizer.encode(text)
    ids.append(_baseline_tokenizer.eod)
    return ids


def per_document(input_path: Path, tokenizer_path: str, out_prefix: Path, workers: int) -> tuple[int, int]:
    """Line by line, one encode call per document, IndexedDatasetBuilder.add_item per document."""
    import io

    import torch
    import zstandard
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    _baseline_init(tokenizer_path)
    builder = IndexedDatasetBuilder(str(out_prefix) + ".bin", dtype=DType.optimal_dtype(_baseline_tokenizer.vocab_size))
    documents = tokens = 0
    with open(input_path, "rb") as raw:
        lines = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8")
        if workers == 1:
            encoded = map(_baseline_encode, lines)
            pool = None
        else:
            pool = multiprocessing.get_context("spawn").Pool(workers, _baseline_init, (tokenizer_path,))
            encoded = pool.imap(_baseline_encode, lines, chunksize=32)
        for ids in encoded:
            if ids is None:
                continue
            builder.add_item(torch.from_numpy(numpy.asarray(ids, dtype=numpy.int32)))
            builder.end_document()
            documents += 1
            tokens += len(ids)
        if pool is not None:
            pool.close()
            pool.join()
    builder.finalize(str(out_prefix) + ".idx")
    return documents, tokens


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------


def text_batches(texts: list[str], batch_bytes: int = 1 << 20) -> list[list[str]]:
    """Consecutive texts in batches of about ``batch_bytes`` (the tool's chunk size).

    The batch size matters: a tokenizers batch of hundreds of 13 kB documents
    runs ~40% slower than batches of ~1 MB (all their Encoding objects are
    alive at once), so a ceiling measured with huge batches would not be one.
    """
    batches, batch, size = [], [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= batch_bytes:
            batches.append(batch)
            batch, size = [], 0
    if batch:
        batches.append(batch)
    return batches


def ceiling(tokenizer: Tokenizer, batches: list[list[str]], workers: int) -> tuple[int, int]:
    documents = tokens = 0
    for batch in batches:
        tokens += sum(map(len, tokenizer.encode_batch(batch, num_threads=workers)))
        documents += len(batch)
    return documents, tokens + documents  # + EOD, to count tokens like the writers do


def _busy_and_total_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _own_cpu_seconds() -> float:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def wait_for_quiet(max_wait: float, threshold: float = 0.15) -> float:
    """Wait until the machine's CPUs are idle (others use < threshold cores); return the wait."""
    started = time.monotonic()
    ticks = os.sysconf("SC_CLK_TCK")
    while time.monotonic() - started < max_wait:
        busy0, _ = _busy_and_total_jiffies()
        time.sleep(1.0)
        busy1, _ = _busy_and_total_jiffies()
        if (busy1 - busy0) / ticks < threshold:
            break
    return time.monotonic() - started


def measure_one(mode: str, workers: int, input_path: Path, tokenizer_path: str, out: Path) -> dict:
    """One timed run, in this (fresh) process: imports and input loading happen before the clock starts."""
    import megatron.core.datasets.indexed_dataset  # noqa: F401
    import torch  # noqa: F401

    batches = text_batches([t for t, _ in iter_documents([input_path])]) if mode == "ceiling" else None
    started = time.perf_counter()
    if mode == "tool":
        tokenizer = load_tokenizer(tokenizer_path)
        manifest = tokenize_corpus([input_path], tokenizer, out / "data",
                                   TokenizeOptions(workers=workers, shard_bytes=None), progress=False)
        documents, tokens = manifest["totals"]["documents"], manifest["totals"]["tokens"]
    elif mode == "per-doc":
        documents, tokens = per_document(input_path, tokenizer_path, out / "data", workers)
    else:
        tokenizer = load_tokenizer(tokenizer_path)
        documents, tokens = ceiling(tokenizer, batches, workers)
    return {"seconds": time.perf_counter() - started, "documents": documents, "tokens": tokens}


def run_once(mode: str, workers: int, input_path: Path, tokenizer_path: str, work: Path):
    """``measure_one`` in a fresh process, as a real run would be: a long-lived benchmark
    process's heap makes allocation-heavy tokenizers (tokenizers' Encodings) erratically slower."""
    import subprocess

    out = work / f"{mode}-{workers}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    spec = json.dumps({"mode": mode, "workers": workers, "input": str(input_path), "tokenizer": tokenizer_path,
                       "out": str(out)})
    busy_start, _ = _busy_and_total_jiffies()
    own_start = _own_cpu_seconds()
    wall = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--one", spec], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - wall
    result = json.loads(done.stdout.strip().splitlines()[-1])
    busy = (_busy_and_total_jiffies()[0] - busy_start) / os.sysconf("SC_CLK_TCK")
    other_load = max(0.0, busy - (_own_cpu_seconds() - own_start)) / wall
    return result["seconds"], result["documents"], result["tokens"], other_load


def measure(name: str, input_path: Path, tokenizer_path: str, texts: list[str], repeats: int, work: Path,
            quiet_wait: float) -> dict:
    text_bytes = sum(len(t.encode("utf-8")) for t in texts)
    modes = ("tool", "per-doc", "ceiling")
    seconds = {(m, w): [] for m in modes for w in WORKERS}
    loads = {(m, w): [] for m in modes for w in WORKERS}
    counts = {}
    for repeat in range(repeats):
        order = [(m, w) for m in modes for w in WORKERS]
        if repeat % 2:
            order.reverse()
        for mode, workers in order:
            waited = wait_for_quiet(quiet_wait)
            s, documents, tokens, other = run_once(mode, workers, input_path, tokenizer_path, work)
            seconds[(mode, workers)].append(s)
            loads[(mode, workers)].append(other)
            counts.setdefault((mode, workers), (documents, tokens))
            print(f"  {name} {mode:8s} W={workers}: {s:6.2f} s (other load {other:.2f} cores, "
                  f"waited {waited:.0f} s for quiet)", file=sys.stderr, flush=True)
        # Same bytes from the tool and the per-document loop: the comparison is like for like.
        for workers in WORKERS:
            a = (work / f"tool-{workers}" / "data.bin").read_bytes()
            b = (work / f"per-doc-{workers}" / "data.bin").read_bytes()
            assert a == b, f"{name}: tool and per-document outputs differ at W={workers}"
    results = {}
    for (mode, workers), runs in seconds.items():
        documents, tokens = counts[(mode, workers)]
        best = min(runs)
        results.setdefault(mode, {})[str(workers)] = {
            "seconds": [round(s, 3) for s in runs],
            "other_load": [round(x, 2) for x in loads[(mode, workers)]],
            "other_load_of_best": round(loads[(mode, workers)][runs.index(best)], 2),
            "best_s": round(best, 3),
            "median_s": round(statistics.median(runs), 3),
            "docs_per_s": round(documents / best, 1),
            "tokens_per_s": round(tokens / best),
            "mb_per_s": round(text_bytes / best / 1e6, 3),
        }
    ratios = {}
    for workers in map(str, WORKERS):
        tool = results["tool"][workers]["tokens_per_s"]
        ratios[workers] = {
            "tool_vs_per_doc": round(tool / results["per-doc"][workers]["tokens_per_s"], 3),
            "tool_vs_ceiling": round(tool / results["ceiling"][workers]["tokens_per_s"], 3),
        }
    ratios["tool_2_vs_1_workers"] = round(results["tool"]["2"]["tokens_per_s"] / results["tool"]["1"]["tokens_per_s"], 3)
    return {"documents": len(texts), "text_bytes": text_bytes, "mean_doc_bytes": round(text_bytes / len(texts)),
            "results": results, "ratios": ratios}


def markdown(report: dict) -> str:
    lines = [
        "| tokenizer | corpus (docs, mean size) | W | tool docs/s | tool tokens/s | tool MB/s | per-doc tokens/s "
        "| ceiling tokens/s | tool / per-doc | tool / ceiling | other load (tool, per-doc, ceiling) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, entry in report["runs"].items():
        tokenizer, corpus = key.split("/")
        for w in map(str, WORKERS):
            r = entry["results"]
            lines.append(
                f"| {tokenizer} | {corpus} ({entry['documents']:,}, {entry['mean_doc_bytes'] / 1000:.1f} kB) | {w} "
                f"| {r['tool'][w]['docs_per_s']:,.0f} | {r['tool'][w]['tokens_per_s']:,} | {r['tool'][w]['mb_per_s']:.2f} "
                f"| {r['per-doc'][w]['tokens_per_s']:,} | {r['ceiling'][w]['tokens_per_s']:,} "
                f"| {entry['ratios'][w]['tool_vs_per_doc']:.2f}x | {entry['ratios'][w]['tool_vs_ceiling']:.0%} "
                f"| {r['tool'][w]['other_load_of_best']:.2f}, {r['per-doc'][w]['other_load_of_best']:.2f}, "
                f"{r['ceiling'][w]['other_load_of_best']:.2f} |"
            )
    return "\n".join(lines)


def update_docs(table: str, report: dict) -> None:
    path = ROOT / "docs" / "data_prep.md"
    text = path.read_text()
    start, end = DOCS_MARKERS
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no {start} ... {end} block to update")
    machine = report["machine"]
    body = (
        f"{start}\n`python bench/data_prep.py` ({report['date'][:10]}, {machine['cpus']}-core CPU, "
        f"load average {machine['loadavg_start'][0]:.1f} at start; best of {report['repeats']} interleaved runs; "
        f"{report['input_mb']:.1f} MB of text per run):\n\n{table}\n{end}"
    )
    path.write_text(text[: text.index(start)] + body + text[text.index(end) + len(end):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-bytes", type=int, default=30_000_000,
                        help="text budget of the stdlib corpus (default: %(default)s, i.e. all of it)")
    parser.add_argument("--copies", type=int, default=2, help="times the corpus is repeated (default: %(default)s)")
    parser.add_argument("--work", help="working folder (default: a temporary one)")
    parser.add_argument("--update-docs", action="store_true", help="write the table into docs/data_prep.md")
    parser.add_argument("--quiet-wait", type=float, default=60.0,
                        help="seconds to wait for idle CPUs before each run (default: %(default)s)")
    parser.add_argument("--one", metavar="JSON", help=argparse.SUPPRESS)  # internal: one timed run
    args = parser.parse_args()
    if args.one:
        spec = json.loads(args.one)
        result = measure_one(spec["mode"], spec["workers"], Path(spec["input"]), spec["tokenizer"], Path(spec["out"]))
        print(json.dumps(result))
        return

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_data_prep_"))
    work.mkdir(parents=True, exist_ok=True)
    loadavg_start = os.getloadavg()
    corpus_dir = work / f"corpus-{args.max_bytes}"
    if not demo_corpus.corpus_is_complete(corpus_dir):
        demo_corpus.build_demo_corpus(corpus_dir, max_bytes=args.max_bytes, valid_fraction=0.0001)
    stdlib = [text for text, _ in iter_documents([corpus_dir / demo_corpus.TRAIN_FILE])] * args.copies
    corpora = {"stdlib": stdlib, "pile-like": pile_like(stdlib)}
    paths = {}
    for name, texts in corpora.items():
        paths[name] = work / f"{name}.jsonl.zst"
        write_corpus(paths[name], texts)

    tokenizers = {
        "sentencepiece": str(work / "sp.model"),
        "tokenizer.json": str(work / "tokenizer.json"),
    }
    if not Path(tokenizers["sentencepiece"]).exists():
        train_sentencepiece([corpus_dir / demo_corpus.TRAIN_FILE], work / "sp", vocab_size=VOCAB)
    if not Path(tokenizers["tokenizer.json"]).exists():
        hf_tokenizer(stdlib[: len(stdlib) // args.copies], Path(tokenizers["tokenizer.json"]))

    runs = {}
    for tok_name, tok_path in tokenizers.items():
        for corpus_name, texts in corpora.items():
            print(f"{tok_name} / {corpus_name}", file=sys.stderr, flush=True)
            runs[f"{tok_name}/{corpus_name}"] = measure(f"{tok_name}/{corpus_name}", paths[corpus_name], tok_path,
                                                        texts, args.repeats, work, args.quiet_wait)
    import sentencepiece
    import tokenizers as hf_tokenizers

    report = {
        "benchmark": "data_prep",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_start": loadavg_start, "loadavg_end": os.getloadavg()},
        "versions": {"sentencepiece": sentencepiece.__version__, "tokenizers": hf_tokenizers.__version__},
        "repeats": args.repeats,
        "copies": args.copies,
        "input_mb": round(sum(len(t.encode()) for t in stdlib) / 1e6, 2),
        "vocab_size": VOCAB,
        "runs": runs,
    }
    table = markdown(report)
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(exist_ok=True)
    out = results_dir / f"data_prep-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(table)
    print(f"\nresults: {out}", file=sys.stderr)
    if args.update_docs:
        update_docs(table, report)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
