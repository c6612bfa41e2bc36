"""Training-step throughput of the stack (Trainer: megatron-core layers + DeepSpeed engine)
at several parallel layouts, against plain-PyTorch training loops of the same model.

    python bench/parallel_step.py                                  # demo model, layouts 1x1x1,2x1x1,1x2x1,1x1x2
    python bench/parallel_step.py --layouts 1x1x1,2x1x1                 # TPxPPxDP
    python bench/parallel_step.py --config configs/pythia-160m/mesh.yaml train.bf16=true   # on a GPU

A layout is TPxPPxDP (world size = TP * PP * DP). Every layout trains the same
global batch (the config's ``train.global_batch_size`` sequences of
``model.seq_length`` tokens per optimizer step) with the same micro-batch
shape (``train.micro_batch_size`` = global batch / the largest DP among the
layouts, unless given; smaller DP reaches the global batch by gradient
accumulation) on the demo corpus (built by ``mesh data prepare-demo`` if
missing).

World size 1 also times, interleaved round-robin with the stack in one process
so that machine noise hits all of them alike:

* ``megatron+AdamW``: the same ``MeshLanguageModel`` (``build_model``), stepped
  by a hand-written loop: micro-batch forward/backward, ``clip_grad_norm_``,
  ``torch.optim.AdamW`` (same parameter groups). Stack minus this = the cost
  of DeepSpeed and the Trainer (data loading included).
* ``plain nn.Module``: a hand-written GPT-NeoX/MeSH model in plain PyTorch
  (``nn.Linear``, ``nn.LayerNorm``, ``F.scaled_dot_product_attention``,
  rotary on 25% of each head, the same recurrence equations), with the same
  parameter count (checked), stepped by the same loop on the same shapes.
  Stack minus this = the whole framework overhead (megatron's layers too).
  Target: the stack within 10% of it. On CPU it runs with the CPU shim's
  TorchFunctionMode disabled (``pretrain/compat.py``'s CPU shim routes every torch
  call of the process through Python to map ``device="cuda"``); the variant
  ``plain nn.Module, CPU shim on`` measures what the shim alone costs. The
  stack's non-pipelined step, and the ``megatron+AdamW`` loop, run with that
  mapping suspended (``cuda_literals_unmapped``), the other patches in place.

Besides the ratio of medians, the world-size-1 table gives the median of the
paired per-block ratios (each block: ``--steps`` consecutive steps of one
variant, blocks taken round-robin), which drifting machine load disturbs less.

Each multi-rank layout runs under ``torchrun`` with the cores divided between
the ranks (OMP_NUM_THREADS = cores / world size). Reported per layout: median
step time, tokens/s, and the ratio to world size 1.

GPU section (only when CUDA is available): model FLOPs utilisation,

    MFU = F_token * tokens_per_s / (world_size * peak_flops)
    F_token = 6 * N_compute + 12 * L_compute * s * d

with N_compute the parameters applied per token (prelude + N_loop x core +
coda layers, routers applied once per use, and the output head; not the input
embedding, a lookup), L_compute the compute depth, s the sequence length and d
the hidden size: 6 FLOPs per parameter and token for forward + backward, and
the attention scores and weighted values (2 matmuls of s x d per token per
layer, x 3 for forward + backward, x 2 FLOPs per multiply-add), counted over the
whole s x s square as in the PaLM paper's accounting (causal masking skips
about half of that work on some kernels). Peak: ``--peak-tflops``, or a table
of dense bf16 peaks by device name. The CPU report gives the same F_token
times tokens/s as achieved model GFLOP/s.

Results go to bench/results/parallel_step-<date>.json and a markdown table on
stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pretrain.library_warnings import quiet_known_warnings  # noqa: E402

quiet_known_warnings()

DEFAULT_LAYOUTS = "1x1x1,2x1x1,1x2x1,1x1x2"


def parse_layout(text: str) -> tuple[int, int, int]:
    try:
        tp, pp, dp = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"layout {text!r} must be TPxPPxDP, e.g. 2x1x1") from None
    if min(tp, pp, dp) < 1:
        raise SystemExit(f"layout {text!r}: every size must be >= 1")
    return tp, pp, dp


# --------------------------------------------------------------------------- plain PyTorch model
def plain_model(model_config):
    """The same architecture in plain PyTorch: embedding * sqrt(d) -> prelude -> loop(core)
    with the config's recurrence -> coda -> LayerNorm -> head. Batch-first [b, s, d]."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    cfg = model_config
    d, heads, head_dim = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    rot = int(head_dim * cfg.rotary_percent)

    class Rotary(nn.Module):
        def __init__(self):
            super().__init__()
            inv_freq = 1.0 / (cfg.rotary_base ** (torch.arange(0, rot, 2).float() / rot))
            angles = torch.outer(torch.arange(cfg.seq_length).float(), inv_freq)
            emb = torch.cat([angles, angles], dim=-1)
            self.register_buffer("cos", emb.cos(), persistent=False)
            self.register_buffer("sin", emb.sin(), persistent=False)

        def forward(self, x):  # [b, heads, s, head_dim]
            s = x.shape[2]
            x_rot, x_pass = x[..., :rot], x[..., rot:]
            half = rot // 2
            rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
            x_rot = x_rot * self.cos[:s].to(x.dtype) + rotated * self.sin[:s].to(x.dtype)
            return torch.cat([x_rot, x_pass], dim=-1)

    class Layer(nn.Module):
        def __init__(self, rotary):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d, eps=cfg.layernorm_epsilon), nn.LayerNorm(d, eps=cfg.layernorm_epsilon)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc1, self.fc2 = nn.Linear(d, cfg.ffn_size), nn.Linear(cfg.ffn_size, d)
            self.rotary = rotary

        def attention(self, x):
            b, s, _ = x.shape
            q, k, v = self.qkv(x).view(b, s, heads, 3 * head_dim).transpose(1, 2).split(head_dim, dim=-1)
            q, k = self.rotary(q), self.rotary(k)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.proj(out.transpose(1, 2).reshape(b, s, d))

        def forward(self, x):
            return x + self.attention(self.ln1(x)) + self.fc2(F.gelu(self.fc1(self.ln2(x))))

    class PlainLM(nn.Module):
        def __init__(self):
            super().__init__()
            split = cfg.split
            self.rotary = Rotary()
            self.embedding = nn.Embedding(cfg.padded_vocab_size, d)
            self.prelude = nn.ModuleList(Layer(self.rotary) for _ in range(split.prelude))
            self.core = nn.ModuleList(Layer(self.rotary) for _ in range(split.core))
            self.coda = nn.ModuleList(Layer(self.rotary) for _ in range(split.coda))
            self.loops = split.loops
            if cfg.variant == "mesh":
                steps, slots = split.loops + 1, cfg.buffer_slots
                self.write = nn.ModuleList(nn.Linear(d, slots) for _ in range(steps))
                self.read = nn.ModuleList(nn.Linear(d, slots) for _ in range(steps))
            self.final_ln = nn.LayerNorm(d, eps=cfg.layernorm_epsilon)
            self.head = nn.Linear(d, cfg.padded_vocab_size, bias=False)
            for p in self.parameters():  # the init is irrelevant to speed; keep values tame
                if p.ndim >= 2:
                    nn.init.normal_(p, std=cfg.init_method_std)

        def core_step(self, h):
            for layer in self.core:
                h = layer(h)
            return h

        def recurrence(self, p, emb):
            variant = cfg.variant
            if variant == "vanilla":
                return p
            if variant != "mesh":
                h = p
                for _ in range(self.loops):
                    sup = {"base": None, "residual": h, "anchor": p, "anchor_emb": emb}[variant]
                    h = self.core_step(h) if sup is None else self.core_step(h) + sup
                return h
            slots = cfg.buffer_slots
            buffer = torch.cat([emb.unsqueeze(0), emb.new_zeros((slots - 1, *emb.shape))], dim=0)

            def weights(router, query):
                return torch.softmax(router(query).float(), dim=-1).to(query.dtype).permute(2, 0, 1).unsqueeze(-1)

            buffer = buffer + weights(self.write[0], p) * p.unsqueeze(0)
            h = (buffer * weights(self.read[0], p)).sum(0)
            for t in range(1, self.loops + 1):
                w_write, w_read = weights(self.write[t], h), weights(self.read[t], h)
                buffer = buffer + w_write * self.core_step(h).unsqueeze(0)
                h = (buffer * w_read).sum(0)
            return h

        def forward(self, tokens, labels):
            emb = self.embedding(tokens) * (math.sqrt(d) if cfg.scale_embeddings else 1.0)
            h = emb
            for layer in self.prelude:
                h = layer(h)
            h = self.recurrence(h, emb)
            for layer in self.coda:
                h = layer(h)
            logits = self.head(self.final_ln(h))
            return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

    return PlainLM()


def make_optimizer(model, config):
    """torch.optim.AdamW with the stack's parameter groups and hyperparameters."""
    import torch

    from pretrain.engine import param_groups

    opt = config.optim
    groups = param_groups(model, opt.weight_decay)
    return torch.optim.AdamW(groups, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps)


# --------------------------------------------------------------------------- FLOPs
def flops_per_token(model_config) -> dict:
    """F_token = 6 * N_compute + 12 * L_compute * s * d (mesh_model/flops.py)."""
    from mesh_model.flops import flops_per_token as token_flops

    flops = token_flops(model_config)
    return {"n_compute": flops.n_compute, "flops_per_token": flops.total,
            "attention_flops_per_token": flops.attention}


# --------------------------------------------------------------------------- worker
def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from pretrain.config import load_config
    from pretrain.trainer import Trainer, masked_mean

    tp, pp, dp = parse_layout(args.layout)
    total_steps = args.warmup + args.repeats * args.steps
    run_dir = Path(args.tmp) / f"run-{args.layout}"  # the same on every rank (rank 0 builds the data cache)
    overrides = [
        *args.overrides,
        f"parallel.tensor={tp}", f"parallel.pipeline={pp}",
        f"data.tokenizer={Path(args.data_dir) / 'tokenizer.model'}",
        f"data.train=[{Path(args.data_dir) / 'train_text_document'}]", "data.valid=[]",
        f"train.steps={total_steps}", "train.eval_interval=0", "logging.wandb_mode=disabled",
        "logging.progress_bar=false", "checkpoint.save_at_end=false", f"logging.run_dir={run_dir}",
    ]
    config = load_config(args.config, overrides)
    trainer = Trainer(config)
    device = trainer.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tokens_per_step = config.train.global_batch_size * config.model.seq_length

    timers: dict[str, callable] = {"stack": trainer.train_step}
    param_counts = {"stack": sum(p.numel() for p in trainer.model.parameters())}
    world = dist.get_world_size()
    if world == 1 and not args.stack_only:
        from mesh_model.model import build_model

        dtype = torch.bfloat16 if config.train.bf16 else torch.float32
        mbs, accum, seq = config.train.micro_batch_size, trainer.plan.grad_accum, config.model.seq_length
        generator = torch.Generator().manual_seed(0)
        vocab = trainer.tokenizer.vocab_size
        tokens = torch.randint(0, vocab, (accum, mbs, seq + 1), generator=generator).to(device)
        positions = torch.arange(seq, device=device).unsqueeze(0).expand(mbs, -1)
        mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=device), 1)[None, None]
        ones = torch.ones(mbs, seq, device=device)

        megatron_model = build_model(config.model, params_dtype=dtype).to(device)
        plain = plain_model(config.model).to(device=device, dtype=dtype)

        param_counts["megatron+AdamW"] = sum(p.numel() for p in megatron_model.parameters())
        param_counts["plain nn.Module"] = sum(p.numel() for p in plain.parameters())
        if param_counts["plain nn.Module"] != param_counts["stack"]:
            raise SystemExit(f"the plain model has {param_counts['plain nn.Module']:,} parameters, "
                             f"the stack {param_counts['stack']:,}: not the same shape")

        def make_step(model, loss_fn, context=contextlib.nullcontext):
            optimizer = make_optimizer(model, config)

            def step():
                with context():
                    return run_step()

            def run_step():
                total = 0.0
                for i in range(accum):
                    loss = loss_fn(model, tokens[i, :, :-1], tokens[i, :, 1:])
                    (loss / accum).backward()
                    total += loss.detach()
                if config.optim.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                return float(total) / accum

            return step

        def megatron_loss(model, x, y):
            return masked_mean(model(x, positions, mask, labels=y), {"loss_mask": ones})

        from pretrain.compat import cuda_literals_unmapped, is_cpu_shim_applied

        # The stack's non-pipelined step runs without the shim's per-call device mapping
        # (Trainer.train_step); the megatron loop gets the same treatment. A plain PyTorch
        # program would have no TorchFunctionMode at all.
        timers["megatron+AdamW"] = make_step(megatron_model, megatron_loss, cuda_literals_unmapped)
        timers["plain nn.Module"] = make_step(plain, lambda model, x, y: model(x, y), torch._C.DisableTorchFunction)
        if is_cpu_shim_applied():
            plain_shim = plain_model(config.model).to(device=device, dtype=dtype)
            timers["plain nn.Module, CPU shim on"] = make_step(plain_shim, lambda model, x, y: model(x, y))

    def timed(fn) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        for fn in timers.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(args.repeats):  # round-robin: noise hits every variant alike
        for name, fn in timers.items():
            samples[name].extend(timed(fn) for _ in range(args.steps))
    if dist.get_rank() == 0:
        result = {
            "layout": args.layout, "world": world, "tp": tp, "pp": pp, "dp": dp,
            "threads_per_rank": torch.get_num_threads(), "device": str(device),
            "tokens_per_step": tokens_per_step, "grad_accum": trainer.plan.grad_accum,
            "micro_batch_size": config.train.micro_batch_size,
            "params_on_rank0": param_counts, "flops": flops_per_token(config.model),
            "median_step_s": {k: statistics.median(v) for k, v in samples.items()},
            "all_step_s": samples,
        }
        Path(args.out).write_text(json.dumps(result, indent=1))
    trainer.close()


# --------------------------------------------------------------------------- orchestration
def launch(layout: str, args, tmp: Path) -> dict:
    tp, pp, dp = parse_layout(layout)
    world = tp * pp * dp
    tmp.mkdir(parents=True, exist_ok=True)
    out = tmp / f"{layout}.json"
    cores = os.cpu_count() or 1
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("MESH_DIST_TIMEOUT_S", "600")
    common = [str(Path(__file__).resolve()), "--worker", "--layout", layout, "--out", str(out),
              "--config", args.config, "--data-dir", args.data_dir, "--tmp", str(tmp),
              "--steps", str(args.steps), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
              *(["--stack-only"] if args.stack_only else []), *args.overrides]
    if world == 1:
        if args.threads is None:
            env.pop("OMP_NUM_THREADS", None)  # torch's default: every core
        else:
            env["OMP_NUM_THREADS"] = str(args.threads)
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name, None)
        cmd = [sys.executable, *common]
    else:
        env["OMP_NUM_THREADS"] = str(args.threads or max(1, cores // world))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
               "--max-restarts", "0", *common]
    print(f"layout {layout} (TP {tp} x PP {pp} x DP {dp}): running ...", flush=True)
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    if result.returncode != 0:
        lines = [l for l in (result.stdout + result.stderr).splitlines()
                 if "warn" not in l.lower() and "Error" in l or l.startswith("[rank")]
        raise SystemExit(f"layout {layout} failed (exit {result.returncode}):\n" + "\n".join(lines[-40:]))
    return json.loads(out.read_text())


def merge_rounds(results: list[dict]) -> dict:
    """One layout's launches pooled: all step times together, medians over all of them."""
    merged = dict(results[0])
    merged["all_step_s"] = {name: [t for r in results for t in r["all_step_s"][name]]
                            for name in results[0]["all_step_s"]}
    merged["median_step_s"] = {name: statistics.median(v) for name, v in merged["all_step_s"].items()}
    merged["rounds"] = len(results)
    return merged


def peak_flops(args) -> float | None:
    import torch

    from pretrain.mfu import peak_flops as device_peak

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return device_peak(device, args.peak_tflops)


def report(results: list[dict], args) -> dict:
    import torch

    base = next((r for r in results if r["world"] == 1), None)
    on_gpu = any(r["device"].startswith("cuda") for r in results)
    peak = peak_flops(args) if on_gpu else None
    flops = results[0]["flops"]
    rows = []
    for r in results:
        step = r["median_step_s"]["stack"]
        row = {"layout": r["layout"], "world": r["world"], "step_s": step,
               "tokens_per_s": r["tokens_per_step"] / step,
               "vs_world1": step / base["median_step_s"]["stack"] if base else None}
        if flops:
            row["model_gflops"] = flops["flops_per_token"] * row["tokens_per_s"] / 1e9
            if peak:
                row["mfu"] = flops["flops_per_token"] * row["tokens_per_s"] / (r["world"] * peak)
        rows.append(row)
    baselines = {}
    if base and len(base["median_step_s"]) > 1:
        stack = base["median_step_s"]["stack"]
        # Round-robin blocks (args.steps consecutive steps of one variant, then the next):
        # the ratio of block medians, paired, is less sensitive to the machine's load drifting
        # between blocks than the ratio of the overall medians.
        def blocks(samples):
            return [statistics.median(samples[i:i + args.steps]) for i in range(0, len(samples), args.steps)]

        stack_blocks = blocks(base["all_step_s"]["stack"])
        for name, value in base["median_step_s"].items():
            ratios = [a / b for a, b in zip(stack_blocks, blocks(base["all_step_s"][name]))]
            baselines[name] = {"step_s": value, "tokens_per_s": base["tokens_per_step"] / value,
                               "stack_overhead": stack / value - 1.0,
                               "stack_overhead_paired": statistics.median(ratios) - 1.0}
    return {
        "benchmark": "parallel_step",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": args.config, "overrides": args.overrides,
        "steps_per_repeat": args.steps, "repeats": args.repeats, "warmup": args.warmup, "rounds": args.rounds,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "peak_flops": peak},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "flops": flops, "layouts": rows, "world1_baselines": baselines, "raw": results,
    }


def print_table(summary: dict) -> None:
    print(f"\n`python bench/parallel_step.py` ({summary['date'][:10]}, {summary['machine']['cpus']} CPUs"
          f"{', ' + summary['machine']['gpu'] if summary['machine']['gpu'] else ''}; config {summary['config']} "
          f"{' '.join(summary['overrides'])}; median of {summary['rounds']} launches x {summary['repeats']} x "
          f"{summary['steps_per_repeat']} steps):\n")
    has_mfu = any("mfu" in r for r in summary["layouts"])
    print("| layout (TPxPPxDP) | world | step (s) | tokens/s | step vs world 1 | model GFLOP/s |"
          + (" MFU |" if has_mfu else ""))
    print("|---|---|---|---|---|---|" + ("---|" if has_mfu else ""))
    for r in summary["layouts"]:
        ratio = f"{r['vs_world1']:.2f}" if r["vs_world1"] is not None else "-"
        gflops = f"{r['model_gflops']:.1f}" if "model_gflops" in r else "-"
        line = f"| {r['layout']} | {r['world']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {ratio} | {gflops} |"
        if has_mfu:
            line += f" {100 * r['mfu']:.1f}% |" if "mfu" in r else " - |"
        print(line)
    if summary["world1_baselines"]:
        print("\n| world size 1 | step (s) | tokens/s | stack overhead vs this | paired per block |")
        print("|---|---|---|---|---|")
        for name, b in summary["world1_baselines"].items():
            overhead = "-" if name == "stack" else f"{100 * b['stack_overhead']:+.1f}%"
            paired = "-" if name == "stack" else f"{100 * b['stack_overhead_paired']:+.1f}%"
            print(f"| {name} | {b['step_s']:.3f} | {b['tokens_per_s']:,.0f} | {overhead} | {paired} |")
    if summary["flops"]:
        f = summary["flops"]
        print(f"\nF_token = 6 x {f['n_compute']:,} + {f['attention_flops_per_token']:,} = "
              f"{f['flops_per_token']:,} FLOPs per token"
              + (f"; peak {summary['machine']['peak_flops'] / 1e12:.1f} TFLOP/s per GPU"
                 if summary["machine"]["peak_flops"] else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", default=DEFAULT_LAYOUTS, help="comma-separated TPxPPxDP layouts")
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--data-dir", default=str(ROOT / "data" / "demo"),
                        help="demo corpus shards + tokenizer (built if missing)")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="round-robin repeats")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=2,
                        help="launches per layout, round-robin over the layouts (samples pooled)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads per rank (default: all cores at world size 1, cores / world size otherwise)")
    parser.add_argument("--stack-only", action="store_true", help="skip the plain-PyTorch baselines")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s per GPU for MFU (TFLOP/s)")
    parser.add_argument("--out", default=None, help="results folder (default bench/results) / worker output file")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per layout")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layout", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="SECTION.FIELD=VALUE", help="config overrides")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    layouts = [l.strip() for l in args.layouts.split(",") if l.strip()]
    max_dp = max(parse_layout(layout)[2] for layout in layouts)
    if not any(o.startswith("train.micro_batch_size=") for o in args.overrides):
        # One micro-batch shape for every layout: the global batch over the largest DP.
        from pretrain.config import load_config

        global_batch = load_config(args.config, list(args.overrides)).train.global_batch_size
        if global_batch % max_dp:
            raise SystemExit(f"train.global_batch_size={global_batch} is not divisible by DP={max_dp}")
        args.overrides = [*args.overrides, f"train.micro_batch_size={global_batch // max_dp}"]
    data_dir = Path(args.data_dir)
    if not (data_dir / "train_text_document.idx").exists():
        from data_prep.demo import prepare_demo

        prepare_demo(data_dir)
    rounds: dict[str, list[dict]] = {layout: [] for layout in layouts}
    with tempfile.TemporaryDirectory(prefix="parallel-step-") as tmp:
        for index in range(args.rounds):  # round-robin over the layouts: slow drifts in load hit all
            for layout in layouts:
                rounds[layout].append(launch(layout, args, Path(tmp) / f"round{index}"))
    results = [merge_rounds(rounds[layout]) for layout in layouts]
    summary = report(results, args)
    out_dir = Path(args.out) if args.out else ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"parallel_step-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(summary, indent=1))
    print_table(summary)
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
