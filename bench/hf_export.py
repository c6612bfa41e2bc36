"""Conversion to Hugging Face (time and peak memory) and generation speed with and without the KV cache.

    .venv/bin/python bench/hf_export.py convert [--sizes 160m 410m]
    .venv/bin/python bench/hf_export.py generate [--pairs 5]

convert: a checkpoint of each Pythia size's MeSH config (configs/pythia-SIZE/mesh.yaml, or SIZE:VARIANT) with random
weights and Adam moments, as training writes it (3x the weights on disk), is converted by
`mesh convert hf` in a fresh process; its peak RSS (VmHWM) is reported next to the fp32 weight
bytes. The process's own baseline (python, torch, transformers imported) is measured the same way.

generate: greedy generation (demo model: 96 new tokens after a 32-token prompt, its whole context;
Pythia-160M MeSH shape: 32 after 64), KV cache on vs off, in alternating pairs in one process
(bench/paired.py).
Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _model_config(name: str):
    from pretrain.config import load_config

    size, _, variant = name.partition(":")  # "410m" (MeSH) or "410m:vanilla"
    path = REPO / "configs" / "demo.yaml" if name == "demo" else \
        REPO / "configs" / f"pythia-{size}" / f"{variant or 'mesh'}.yaml"
    return load_config(path, ["data.tokenizer=x", "data.train=[x]"]).model


def _make_checkpoint(size: str, out: Path) -> int:
    import torch

    from mesh_hf.import_hf import expected_names, fresh_recurrence_tensors, write_checkpoint

    config = _model_config(size)
    generator = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in expected_names(config).items()}
    tensors.update(fresh_recurrence_tensors(config))
    write_checkpoint(tensors, config, out, 1, 1, None, Path("bench"), adam_moments=True)
    return sum(t.numel() for t in tensors.values())


def _child(code: str) -> dict:
    """Runs python code in a fresh process; returns its JSON line plus its peak RSS."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (this benchmark's
    # own process, which has just built a checkpoint), while the high-water mark starts afresh at exec.
    script = ("import json, sys, time; sys.path.insert(0, %r); t0 = time.perf_counter()\n" % str(REPO)
              + code + "\nhwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]"
              "\nprint(json.dumps({'seconds': time.perf_counter() - t0, 'peak_rss': int(hwm.split()[1]) * 1024}))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def convert(sizes: list[str]) -> None:
    tokenizer = REPO / "data" / "demo" / "tokenizer.model"
    baseline = _child("import torch, transformers, safetensors\nimport mesh_hf.export")
    rows = []
    for size in sizes:
        with tempfile.TemporaryDirectory(dir=REPO / "runs") as tmp:
            ckpt, out = Path(tmp) / "ckpt", Path(tmp) / "hf"
            params = _make_checkpoint(size, ckpt)
            weights = 4 * params
            on_disk = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
            run = _child(f"from mesh_hf.export import export\nexport({str(ckpt)!r}, {str(out)!r}, "
                         f"tokenizer={str(tokenizer)!r}, progress=False)")
            rows.append((size, params, weights, on_disk, run))
    print(f"baseline process (imports only): peak RSS {baseline['peak_rss'] / 2**20:.0f} MiB")
    print("| size | parameters | fp32 weights | checkpoint on disk | time | peak RSS | peak / weights |")
    print("|---|---|---|---|---|---|---|")
    for size, params, weights, on_disk, run in rows:
        print(f"| {size} | {params / 1e6:.0f}M | {weights / 2**30:.2f} GiB | {on_disk / 2**30:.2f} GiB | "
              f"{run['seconds']:.1f} s | {run['peak_rss'] / 2**30:.2f} GiB | {run['peak_rss'] / weights:.2f}x |")


def generate(pairs: int) -> None:
    import torch

    from bench.paired import format_ratio, paired_ratio
    from mesh_hf.export import export
    from mesh_hf.generate import generate as run_generate
    from mesh_hf.loading import load

    torch.set_num_threads(2)
    tokenizer = REPO / "data" / "demo" / "tokenizer.model"
    print("| model | tokens/s with cache | tokens/s without | ratio (cache / none) |")
    print("|---|---|---|---|")
    # (prompt, new tokens): the demo model's context is 128 tokens
    lengths = {"demo": (32, 96), "160m": (64, 32)}
    for name in ("demo", "160m"):
        prompt_len, new_tokens = lengths[name]
        with tempfile.TemporaryDirectory(dir=REPO / "runs") as tmp:
            ckpt, out = Path(tmp) / "ckpt", Path(tmp) / "hf"
            _make_checkpoint(name, ckpt)
            export(ckpt, out, tokenizer=str(tokenizer), progress=False)
            model, tok = load(out)
            prompt = " ".join(["def f(x):\n    return x"] * 12)
            prompt = tok.decode(tok(prompt).input_ids[:prompt_len])
            on, off = [], []
            run_generate(model, tok, prompt, max_new_tokens=4, min_new_tokens=4)  # warm-up
            for _ in range(pairs):
                on.append(run_generate(model, tok, prompt, max_new_tokens=new_tokens,
                                       min_new_tokens=new_tokens).tokens_per_s)
                off.append(run_generate(model, tok, prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                        use_cache=False).tokens_per_s)
            median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
            print(f"| {name} | {median(on):.1f} | {median(off):.1f} | {format_ratio(paired_ratio(on, off))} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("convert")
    p.add_argument("--sizes", nargs="+", default=["160m", "410m", "410m:vanilla"],
                   help="SIZE (its MeSH config) or SIZE:VARIANT, e.g. 410m:vanilla")
    p = sub.add_parser("generate")
    p.add_argument("--pairs", type=int, default=7)
    args = parser.parse_args()
    convert(args.sizes) if args.what == "convert" else generate(args.pairs)


if __name__ == "__main__":
    main()
