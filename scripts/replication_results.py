"""The replication's results step (scripts/replicate.sh step 3): everything docs/replication.md reports.

It runs the project's own commands on the finished sweeps and writes into OUT (docs/replication):

  main/, ablations/        `mesh sweep collect` of configs/sweeps/replication*.yaml (results.csv, .json)
  fit/                     `mesh sweep fit` of main/results.csv (fit.json, fit.txt, the two figures)
  analysis/                `mesh analyze` of base vs MeSH at d=256, seed 1 (analysis.json, PNGs)
  hf/                      the best d=256 MeSH run: `mesh convert hf` (to runs/replication-hf, not committed),
                           loaded with transformers: a greedy sample; `mesh eval ppl` of the held-out set
  summary.json, tables.md  per (width, variant): final validation loss / perplexity mean +- std over the
                           seeds, parameters, tokens/s; the paper's orderings checked with the seeds' spread;
                           the ablations against MeSH
  loss_curves.png, final_loss.png

Every step whose output exists is skipped (a rerun after an interruption redoes only what is missing);
--force redoes them all.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MAIN = Path("configs/sweeps/replication.yaml")
ABLATIONS = Path("configs/sweeps/replication-ablations.yaml")
VALIDATION = "data/replication/text_val"
HF_DIR = Path("runs/replication-hf")
VARIANTS = ["vanilla", "base", "residual", "anchor", "anchor_emb", "mesh"]
WIDTHS = ["d128", "d256"]
PROMPTS = ["def read_config(path):\n", "The standard library"]

#: The paper's claims (mesh-method.md: "mesh < anchor/anchor* < residual ~ base in perplexity", and
#: MeSH close to or below vanilla), as (lower, higher) pairs of variants.
CLAIMS = [("mesh", "anchor"), ("mesh", "anchor_emb"), ("anchor", "base"), ("anchor_emb", "base"),
          ("anchor", "residual"), ("anchor_emb", "residual"), ("mesh", "base"), ("mesh", "residual"),
          ("mesh", "vanilla"), ("residual", "base")]  # the last: the paper has them about equal


def say(message: str) -> None:
    print(f"replication_results: {message}", file=sys.stderr, flush=True)


def mesh(*args: str, log: Path | None = None, threads: int | None = None, required: bool = True) -> str | None:
    """Runs `mesh ARGS`, echoing it; returns stdout (also saved to `log`). A failure stops the script,
    or with required=False is said, saved to `log`, and returns None (a partial sweep: no fit yet)."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    say("$ mesh " + " ".join(args))
    start = time.perf_counter()
    result = subprocess.run(["mesh", *args], capture_output=True, text=True, env=env)
    if log is not None:
        log.write_text(result.stdout + result.stderr)
    if result.returncode != 0 and not required:
        say(f"  skipped: {(result.stderr.strip().splitlines() or ['(no message)'])[-1]}")
        return None
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"replication_results: `mesh {' '.join(args)}` failed (exit {result.returncode})")
    say(f"  ({time.perf_counter() - start:.0f} s)")
    return result.stdout


# --------------------------------------------------------------------------- tables


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarise(results: dict) -> dict:
    """Per (size, variant): the finished runs' final losses, their mean / std, parameters, tokens/s."""
    groups: dict[tuple[str, str], dict] = {}
    for row in results["rows"]:
        if not row["final"]:
            continue
        key = (row["size"], row["variant"])
        group = groups.setdefault(key, {"size": row["size"], "variant": row["variant"],
                                        "parameters": row["parameters"], "parameters_total": row["parameters_total"],
                                        "tokens": row["tokens"], "runs": []})
        group["runs"].append({"seed": row["seed"], "loss": row["loss"], "ppl": math.exp(row["loss"]),
                              "tokens_per_s": row["tokens_per_s"], "run_id": row["run_id"]})
    for group in groups.values():
        group["runs"].sort(key=lambda r: r["seed"])
        group["loss_mean"], group["loss_std"] = mean_std([r["loss"] for r in group["runs"]])
        group["ppl_mean"], group["ppl_std"] = mean_std([r["ppl"] for r in group["runs"]])
        group["tokens_per_s_mean"] = statistics.fmean(r["tokens_per_s"] for r in group["runs"])
        group["seeds"] = len(group["runs"])
    return {f"{size}.{variant}": group for (size, variant), group in groups.items()}


def check_claims(groups: dict, size: str) -> list[dict]:
    """Each claimed ordering at one width, paired by seed: runs of the same seed share the data order
    and the held-out windows they are evaluated on (both follow train.seed), so the per-seed
    difference of final losses removes that shared noise. Reported: the mean difference, its
    standard error over the seeds, the 95% confidence interval of a paired t-test (Student's t with
    seeds - 1 degrees of freedom: 4.30 s.e. with 3 seeds, 12.7 with 2), and a verdict: holds /
    reversed when that interval excludes 0, else not resolved by these seeds."""
    from scipy.stats import t as student_t

    checks = []
    for lower, higher in CLAIMS:
        a, b = groups.get(f"{size}.{lower}"), groups.get(f"{size}.{higher}")
        if not a or not b:
            continue
        by_seed = {r["seed"]: r["loss"] for r in b["runs"]}
        diffs = [r["loss"] - by_seed[r["seed"]] for r in a["runs"] if r["seed"] in by_seed]
        if not diffs:
            continue
        diff = statistics.fmean(diffs)
        se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
        half = float(student_t.ppf(0.975, len(diffs) - 1)) * se if se is not None else None
        if half is not None and abs(diff) > half:
            verdict = "holds" if diff < 0 else "reversed"
        else:
            verdict = "not resolved" + (" (leans holds)" if diff < 0 else " (leans reversed)")
        interval = [diff - half, diff + half] if half is not None else None
        checks.append({"size": size, "claim": f"{lower} < {higher}", "difference": diff, "standard_error": se,
                       "interval95": interval, "seeds": len(diffs), "per_seed": diffs, "verdict": verdict})
    return checks


def fmt_pm(mean: float, std: float | None, digits: int) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def tables_markdown(groups: dict, claims: list[dict], ablations: dict) -> str:
    lines = ["| width | variant | seeds | non-emb. params | total params | tokens | val. loss | val. ppl | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for size in WIDTHS:
        ranked = sorted((g for g in groups.values() if g["size"] == size), key=lambda g: g["loss_mean"])
        for g in ranked:
            lines.append(f"| {size} | {g['variant']} | {g['seeds']} | {g['parameters']:,} | {g['parameters_total']:,} | "
                         f"{g['tokens']:,} | {fmt_pm(g['loss_mean'], g['loss_std'], 4)} | "
                         f"{fmt_pm(g['ppl_mean'], g['ppl_std'], 2)} | {g['tokens_per_s_mean']:,.0f} |")
    lines += ["", "| width | paper's claim | loss difference (paired, mean over seeds) | 95% interval (paired t) | per seed | here |",
              "|---|---|---|---|---|---|"]
    for c in claims:
        interval = f"[{c['interval95'][0]:+.3f}, {c['interval95'][1]:+.3f}]" if c["interval95"] else "n/a"
        per_seed = ", ".join(f"{d:+.3f}" for d in c["per_seed"])
        lines.append(f"| {c['size']} | {c['claim']} | {c['difference']:+.4f} | {interval} | {per_seed} | {c['verdict']} |")
    if ablations:
        reference = groups.get("d128.mesh")
        lines += ["", "| ablation (d128, seed 1) | non-emb. params | val. loss | vs MeSH B=5 seed 1 | vs MeSH B=5 mean (3 seeds) |",
                  "|---|---|---|---|---|"]
        ref_s1 = next((r["loss"] for r in reference["runs"] if r["seed"] == 1), None) if reference else None
        for name, g in ablations.items():
            loss = g["runs"][0]["loss"]
            vs1 = f"{loss - ref_s1:+.4f}" if ref_s1 is not None else "n/a"
            vsm = f"{loss - reference['loss_mean']:+.4f} (std {reference['loss_std']:.4f})" if reference else "n/a"
            lines.append(f"| {g['variant']} | {g['parameters']:,} | {loss:.4f} | {vs1} | {vsm} |")
    return "\n".join(lines) + "\n"


def analysis_markdown(analysis: dict) -> str:
    """base vs MeSH: skew per block, CKA of consecutive states, spectrum tails, router use."""
    checkpoints = analysis["checkpoints"]
    lines = [f"`mesh analyze` on {analysis['sequences']} held-out sequences of {analysis['seq_length']} tokens.", "",
             "| block | " + " | ".join(c["label"] for c in checkpoints) + " |", "|---|" + "---|" * len(checkpoints)]
    blocks = list(checkpoints[0]["skew"]["blocks"])
    for block in blocks:
        cells = [fmt_pm(c["skew"]["blocks"][block]["mean"], c["skew"]["blocks"][block]["std"], 3)
                 if block in c["skew"]["blocks"] else "n/a" for c in checkpoints]
        lines.append(f"| skew {block} | " + " | ".join(cells) + " |")
    states = checkpoints[0]["states"]
    for kernel in ("linear", "rbf"):
        for i in range(len(states) - 1):
            cells = []
            for c in checkpoints:
                index = {name: k for k, name in enumerate(c["states"])}
                a, b = index.get(states[i]), index.get(states[i + 1])
                cells.append(f"{c['cka'][kernel][a][b]:.3f}" if a is not None and b is not None else "n/a")
            lines.append(f"| CKA {kernel} {states[i]} / {states[i + 1]} | " + " | ".join(cells) + " |")
    for state in states:
        for rank in (10, len(checkpoints[0]["spectrum"][state]["mean"]) - 1):
            cells = [f"{c['spectrum'][state]['mean'][rank]:.3f}" if state in c["spectrum"] else "n/a"
                     for c in checkpoints]
            lines.append(f"| sigma_{rank} / sigma_0 of {state} | " + " | ".join(cells) + " |")
    for c in checkpoints:
        routers = c.get("routers")
        if not routers:
            continue
        lines += ["", f"Router statistics of {c['label']} (per router step: entropy as a fraction of log B, "
                      "effective slots of the mean weights, and the mean weight per slot):", "",
                  "| step | router | entropy fraction | effective slots | mean weight per slot |", "|---|---|---|---|---|"]
        for k, step in enumerate(routers["steps"]):
            for side in ("write", "read"):
                stats = routers[side]
                lines.append(f"| {step} | {side} | {stats['entropy_fraction'][k]:.3f} | "
                             f"{stats['effective_slots'][k]:.2f} | "
                             + ", ".join(f"{w:.2f}" for w in stats["mean_weight"][k]) + " |")
        if routers.get("slot_norm"):
            lines += ["", "Mean slot norms after the last write: "
                      + ", ".join(f"slot {b} {v:.1f}" for b, v in enumerate(routers["slot_norm"]))]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots


def plot_results(main: dict, groups: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    from pretrain.run_folder import RunFolder

    colors = dict(zip(VARIANTS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    root = Path(main["root"])
    fig, axes = plt.subplots(1, len(WIDTHS), figsize=(11, 4), sharey=False)
    for ax, size in zip(axes, WIDTHS):
        for variant in VARIANTS:
            group = groups.get(f"{size}.{variant}")
            if not group:
                continue
            # training loss every log interval, mean over the seeds (the same steps in every run)
            curves: dict[int, list[float]] = {}
            for run in group["runs"]:
                for row in RunFolder(root / run["run_id"]).metrics():
                    if "train/loss" in row and "train/tokens" in row:
                        curves.setdefault(int(row["train/tokens"]), []).append(row["train/loss"])
            tokens = sorted(t for t in curves if t >= 40_000)
            ax.plot(tokens, [statistics.fmean(curves[t]) for t in tokens], color=colors[variant], lw=1.2,
                    label=f"{variant} (train)")
            valid = {}
            for row in main["rows"]:
                if row["size"] == size and row["variant"] == variant and row["tokens"] > 0:
                    valid.setdefault(row["tokens"], []).append(row["loss"])
            ax.scatter(sorted(valid), [statistics.fmean(valid[t]) for t in sorted(valid)], color=colors[variant],
                       s=18, zorder=3, edgecolors="black", linewidths=0.5)
        ax.set_title(f"{size}: training loss (lines) and validation loss (dots), mean over seeds", fontsize=9)
        ax.set_xlabel("training tokens")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:.0f}K"))
        ax.set_ylabel("loss (nats / token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(WIDTHS), figsize=(11, 3.8))
    for ax, size in zip(axes, WIDTHS):
        present = [v for v in VARIANTS if f"{size}.{v}" in groups]
        for i, variant in enumerate(present):
            g = groups[f"{size}.{variant}"]
            ax.bar(i, g["loss_mean"], yerr=g["loss_std"] or 0.0, color=colors[variant], capsize=4)
            ax.scatter([i] * g["seeds"], [r["loss"] for r in g["runs"]], color="black", s=8, zorder=3)
        if present:
            low = min(r["loss"] for v in present for r in groups[f"{size}.{v}"]["runs"])
            high = max(r["loss"] for v in present for r in groups[f"{size}.{v}"]["runs"])
            ax.set_ylim(low - 0.4 * (high - low) - 0.01, high + 0.25 * (high - low) + 0.01)
        ax.set_xticks(range(len(present)), present, rotation=20, fontsize=8)
        ax.set_title(f"{size}: final validation loss, mean ± std, dots = seeds")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / "final_loss.png", dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- conversion


def hf_check(best: dict, run_dir: Path, out: Path, force: bool, threads: int = 2) -> dict:
    """The best MeSH run (its summarise() row, its folder) through `mesh convert hf`, loaded with
    transformers, and `mesh eval ppl`."""
    from pretrain.config import load_config

    target = out / "hf"
    target.mkdir(parents=True, exist_ok=True)
    summary_path = target / "hf_check.json"
    if summary_path.is_file() and not force:
        done = json.loads(summary_path.read_text())
        if done.get("run_id") == best["run_id"]:  # a new seed may have made another run the best
            return done
    config = load_config(run_dir / "config.yaml", [])
    folder = HF_DIR / best["run_id"]  # the script's own output: a rerun replaces it
    folder.parent.mkdir(parents=True, exist_ok=True)
    mesh("convert", "hf", str(run_dir), str(folder), "--overwrite", log=target / "convert.txt")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    samples = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**ids, max_new_tokens=48, do_sample=False)
        samples.append({"prompt": prompt, "greedy": tokenizer.decode(generated[0, ids["input_ids"].shape[1]:])})
    same_windows = training_windows_loss(model, config, run_dir)
    seq_length = config.model.seq_length
    mesh("eval", "ppl", str(folder), "--data", VALIDATION, "--context", str(seq_length + 1), "--stride", str(seq_length),
         "--json", str(target / "eval_ppl.json"), log=target / "eval_ppl.txt", threads=threads)
    evaluation = json.loads((target / "eval_ppl.json").read_text())
    summary = {"run_id": best["run_id"], "hf_folder": str(folder), "model_class": type(model).__name__,
               "config_class": type(model.config).__name__, "samples": samples,
               "training_final_validation_loss": best["loss"], "hf_on_training_windows": same_windows,
               "eval_ppl": evaluation}
    summary_path.write_text(json.dumps(summary, indent=1))
    return summary


def training_windows_loss(model, config, run_dir: Path) -> dict:
    """The converted model's loss on exactly the held-out windows the run's training-side
    evaluation used: the same GPTDataset (megatron-core's builder, the run's seed and cached
    indices), its first eval_batches micro-batches, the mean of their mean token losses."""
    import torch

    from data_prep.tokenizer import load_tokenizer
    from pretrain.data import build_datasets

    train = config.train
    datasets = build_datasets(config.data, load_tokenizer(config.data.tokenizer), seq_length=config.model.seq_length,
                              seed=train.seed, train_samples=train.steps * train.global_batch_size,
                              valid_samples=train.eval_batches * train.micro_batch_size,
                              cache_dir=str(run_dir / "data_cache"))
    means = []
    with torch.no_grad():
        for b in range(train.eval_batches):
            samples = [datasets.valid[i] for i in range(b * train.micro_batch_size, (b + 1) * train.micro_batch_size)]
            tokens = torch.stack([torch.as_tensor(s["tokens"]) for s in samples]).long()
            labels = torch.stack([torch.as_tensor(s["labels"]) for s in samples]).long()
            mask = torch.stack([torch.as_tensor(s["loss_mask"]) for s in samples]).float()
            logits = model(input_ids=tokens).logits.float()
            per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
            means.append(float((per_token * mask).sum() / mask.sum()))
    return {"batches": train.eval_batches, "micro_batch_size": train.micro_batch_size,
            "tokens": train.eval_batches * train.micro_batch_size * config.model.seq_length,
            "loss": sum(means) / len(means)}


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/replication", help="where the results go (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="redo every step, even those already written")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads of mesh analyze and mesh eval (default %(default)s; 1 while training runs "
                             "share the cores: more threads than free cores slow torch down many times)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    (out / "main").mkdir(exist_ok=True)
    mesh("sweep", "collect", str(MAIN), "--out", str(out / "main"), log=out / "main" / "collect.txt")
    main_results = json.loads((out / "main" / "results.json").read_text())
    ablation_results = None
    if ABLATIONS.is_file():
        (out / "ablations").mkdir(exist_ok=True)
        mesh("sweep", "collect", str(ABLATIONS), "--out", str(out / "ablations"), log=out / "ablations" / "collect.txt")
        ablation_results = json.loads((out / "ablations" / "results.json").read_text())

    (out / "fit").mkdir(exist_ok=True)
    mesh("sweep", "fit", str(out / "main" / "results.csv"), "--out", str(out / "fit"), log=out / "fit" / "fit.txt",
         required=False)

    groups = summarise(main_results)
    ablations = summarise(ablation_results) if ablation_results else {}
    claims = [c for size in WIDTHS for c in check_claims(groups, size)]
    plot_results(main_results, groups, out)

    # base vs MeSH at the larger width, seed 1 (the same held-out tokens for both)
    analysis = out / "analysis"
    root = Path(main_results["root"])
    base_run, mesh_run = (root / f"d256.{v}.t400k.s1" for v in ("base", "mesh"))
    if (base_run / "COMPLETE").is_file() and (mesh_run / "COMPLETE").is_file() and \
            (args.force or not (analysis / "analysis.json").is_file()):
        mesh("analyze", str(base_run), "--compare", str(mesh_run), "--data", VALIDATION, "-n", "64",
             "--out", str(analysis), "--overwrite", "--quiet", log=out / "analysis.txt", threads=args.threads)

    hf = None
    mesh_groups = [g for g in groups.values() if g["variant"] == "mesh" and g["size"] == WIDTHS[-1]]
    if mesh_groups:
        best_run = min(mesh_groups[0]["runs"], key=lambda r: r["loss"])
        hf = hf_check(best_run, root / best_run["run_id"], out, args.force, args.threads)

    summary = {"groups": groups, "claims": claims, "ablations": ablations, "hf": hf,
               "statuses": {"main": main_results.get("runs"), "ablations": (ablation_results or {}).get("runs")}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    text = tables_markdown(groups, claims, ablations)
    if (analysis / "analysis.json").is_file():
        text += "\n" + analysis_markdown(json.loads((analysis / "analysis.json").read_text()))
    (out / "tables.md").write_text(text)
    say(f"wrote {out}/summary.json, tables.md, loss_curves.png, final_loss.png")
    print((out / "tables.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
