"""Forward+backward step time and memory: MeSH vs recursive base vs vanilla, same shape.

    python bench/model_step.py                # Pythia-160M width, 2+4R2+2, seq 512 (CPU: minutes)
    python bench/model_step.py --hidden 256   # a quicker look

All three models run in one process, interleaved round-robin so that machine
noise hits them alike; the report gives median step times, their ratios to
the recursive base model as the geometric mean of the per-repeat ratios with a
95% interval (bench/paired.py), and memory:
- saved activations: bytes autograd keeps for backward (exact, device-independent);
- peak memory: CUDA max allocated on GPU; on CPU the peak RSS of a separate
  process that builds only that model and runs one step (imports included,
  about the same for all three).
Results go to bench/results/model_step-<date>.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pretrain.library_warnings import quiet_known_warnings  # noqa: E402

quiet_known_warnings()

from mesh_model.config import ModelConfig  # noqa: E402
from mesh_model.model import build_model  # noqa: E402
from mesh_model.params import count_parameters, single_process_model_parallel  # noqa: E402
from pretrain.compat import apply_cpu_shim  # noqa: E402
from bench.paired import format_ratio, paired_ratio  # noqa: E402


def saved_activation_bytes(model, inputs) -> int:
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(*inputs).float().mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return total


def step(model, inputs) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = model(*inputs).float().mean()
    loss.backward()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def build_inputs(args, device):
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    positions = torch.arange(args.seq, device=device).unsqueeze(0).expand(args.batch, -1)
    mask = torch.triu(torch.ones(args.seq, args.seq, dtype=torch.bool, device=device), 1)[None, None]
    return (tokens, positions, mask, tokens)


def model_config(args, variant: str, split: str) -> ModelConfig:
    return ModelConfig(hidden_size=args.hidden, num_attention_heads=args.heads, vocab_size=args.vocab,
                       seq_length=args.seq, layer_split=split, variant=variant)


def cpu_peak_rss_bytes(variant: str) -> int:
    """Peak RSS of a fresh process that builds one model and runs one step."""
    import subprocess

    argv = [a for a in sys.argv[1:]]
    out = subprocess.run([sys.executable, __file__, *argv, "--memory-probe", variant],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1])


def memory_probe(args) -> None:
    variant, split = args.memory_probe, args.variants[args.memory_probe]
    with single_process_model_parallel():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(0)
        model = build_model(model_config(args, variant, split))
        step(model, build_inputs(args, torch.device("cpu")))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--split", default="2+4R2+2")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    apply_cpu_shim()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    depth = ModelConfig(layer_split=args.split, variant="base").compute_depth
    variants = {"vanilla": str(depth), "base": args.split, "mesh": args.split}
    args.variants = variants
    if args.memory_probe:
        return memory_probe(args)

    with single_process_model_parallel():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(0)
        models, params = {}, {}
        inputs = build_inputs(args, device)
        memory = {}
        for variant, split in variants.items():
            torch.manual_seed(0)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            model = build_model(model_config(args, variant, split), params_dtype=dtype).to(device)
            activations = saved_activation_bytes(model, inputs)
            peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else cpu_peak_rss_bytes(variant)
            models[variant] = model
            params[variant] = count_parameters(model)
            memory[variant] = {"saved_activations_bytes": activations, "peak_bytes": peak}
            for _ in range(args.warmup):
                step(model, inputs)

        times = {v: [] for v in variants}
        for _ in range(args.repeats):
            for variant, model in models.items():
                times[variant].append(step(model, inputs))

    median = {v: statistics.median(t) for v, t in times.items()}
    result = {
        "benchmark": "model_step",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "shape": vars(args) | {"compute_depth": depth},
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "median_step_s": median,
        "all_step_s": times,
        "ratio_to_base": {v: median[v] / median["base"] for v in variants},
        # Each repeat steps the three models back to back: a pair per repeat.
        "paired_ratio_to_base": {v: paired_ratio(times[v], times["base"]) for v in variants if v != "base"},
        "memory": memory,
        "non_embedding_params": {v: p.non_embedding for v, p in params.items()},
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"model_step-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))

    base_act = memory["base"]["saved_activations_bytes"]
    print(f"\nd={args.hidden}, {args.split} (vanilla: {depth} layers), seq {args.seq}, batch {args.batch}, "
          f"{'bf16' if args.bf16 else 'fp32'}, {result['device']}, {result['threads']} threads, "
          f"median of {args.repeats}\n")
    peak_name = "peak allocated" if device.type == "cuda" else "peak RSS, own process"
    print(f"| model | fwd+bwd (s) | vs base, paired (95% interval) | saved activations (MiB) | vs base | "
          f"{peak_name} (MiB) | non-emb params |")
    print("|---|---|---|---|---|---|---|")
    for v in variants:
        act = memory[v]["saved_activations_bytes"]
        versus = "1" if v == "base" else format_ratio(result["paired_ratio_to_base"][v])
        print(f"| {v} | {median[v]:.3f} | {versus} | {act / 2**20:.1f} | "
              f"{act / base_act:.3f} | {memory[v]['peak_bytes'] / 2**20:.0f} | {params[v].non_embedding:,} |")
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
