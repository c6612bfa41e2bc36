"""`mesh convert`, `mesh generate`, `mesh eval`: models leaving the stack, and coming back.

    mesh convert hf runs/x/checkpoints/step0010000 out/mesh-160m
    mesh convert from-hf ~/pythia-160m ckpt/pythia-160m --layout tensor=2
    mesh generate out/mesh-160m "The capital of France is" --max-new-tokens 20
    mesh eval ppl out/mesh-160m --data data/pile/val_text_document
    mesh eval lm-eval out/mesh-160m --num-fewshot 0,5
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from mesh_model.config import ConfigError


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 5GB, 500MB or 2000000")
    return int(float(m.group(1)) * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[m.group(2)])


def _layout(text: str) -> dict:
    sizes = {"tensor": 1, "pipeline": 1}
    aliases = {"tp": "tensor", "pp": "pipeline", "tensor": "tensor", "pipeline": "pipeline"}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key.strip() not in aliases or not value.strip().isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(f"--layout {text!r}: write tensor=T,pipeline=P (positive integers)")
        sizes[aliases[key.strip()]] = int(value)
    return sizes


def _convert_hf(args) -> int:
    from mesh_hf.export import export
    from mesh_hf.loading import DTYPES

    report = export(Path(args.checkpoint), Path(args.out), dtype=DTYPES[args.dtype], max_shard_bytes=args.max_shard_size,
                    overwrite=args.overwrite, tokenizer=args.tokenizer)
    kind = "GPTNeoXForCausalLM (native)" if report.native else "MeshForCausalLM (trust_remote_code=True)"
    print(f"wrote {report.out_dir}: {kind}, {report.parameters:,} parameters ({args.dtype}) from step {report.step}, "
          f"{len(report.files)} weight file(s)")
    return 0


def _convert_from_hf(args) -> int:
    from mesh_hf.import_hf import import_hf

    out, model, notes = import_hf(Path(args.hf_dir), Path(args.out), tensor_parallel=args.layout["tensor"],
                                  pipeline_parallel=args.layout["pipeline"], split=args.split, variant=args.variant,
                                  layer_map=args.layer_map, overwrite=args.overwrite)
    for note in notes:
        print(note)
    print(f"wrote {out}: {model.variant} {model.split} at TP{args.layout['tensor']} (step 0, no optimizer state). "
          f"Continue training with: mesh train {out / 'config.yaml'} checkpoint.resume={out} "
          "data.train=[...] logging.run_dir=...")
    return 0


def _generate(args) -> int:
    from mesh_hf.generate import generate
    from mesh_hf.loading import DTYPES, hf_folder, load

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    if not 0 < args.top_p <= 1 or args.temperature < 0:
        raise ConfigError("--top-p must be in (0, 1] and --temperature >= 0")
    with hf_folder(args.model, args.tokenizer) as folder:
        model, tokenizer = load(folder, DTYPES[args.dtype], args.device)
    result = generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, use_cache=not args.no_cache, seed=args.seed)
    print(result.text)
    mode = "greedy" if args.temperature == 0 else f"temperature {args.temperature}, top-p {args.top_p}"
    print(f"[{result.new_tokens} new tokens in {result.seconds:.2f} s: {result.tokens_per_s:.1f} tokens/s, {mode}, "
          f"KV cache {'off' if args.no_cache else 'on'}]")
    return 0


def _eval_ppl(args) -> int:
    from mesh_hf import perplexity
    from mesh_hf.loading import DTYPES, hf_folder, load

    with hf_folder(args.model, args.tokenizer) as folder:
        model, tokenizer = load(folder, DTYPES[args.dtype], args.device)
    context = args.context or model.config.max_position_embeddings
    stride = args.stride or context // 2
    if not 1 <= stride < context:
        raise ConfigError(f"--stride {stride} must be in [1, --context {context}): consecutive windows overlap "
                          "by at least one token")
    data = args.data
    if data.endswith((".jsonl", ".jsonl.zst", ".json")):
        documents = perplexity.jsonl_documents(data, tokenizer, args.max_documents, args.field)
    else:
        documents = perplexity.shard_documents(data, args.max_documents)
    result = perplexity.evaluate(model, documents, lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                                 context=context, stride=stride, batch_size=args.batch_size, source=data)
    print(result.describe())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    return 0


def _eval_lm_eval(args) -> int:
    from mesh_hf import lm_eval_runner as runner
    from mesh_hf.loading import hf_folder

    tasks = list(runner.PAPER_TASKS) if args.tasks == "paper" else [t for t in args.tasks.split(",") if t]
    try:
        shots = [int(s) for s in args.num_fewshot.split(",")]
    except ValueError:
        raise ConfigError(f"--num-fewshot {args.num_fewshot!r}: write numbers joined by commas, e.g. 0,5") from None
    out_dir = Path(args.out)
    with hf_folder(args.model, args.tokenizer) as folder:
        results = runner.run(folder, tasks, shots, include_path=args.include_path, limit=args.limit,
                             batch_size=args.batch_size, device=args.device, download=args.download,
                             dtype={"fp32": "float32", "bf16": "bfloat16"}[args.dtype])
    rows = runner.summary(results)
    table, raw = runner.write(rows, results, out_dir)
    print(runner.markdown_table(rows), end="")
    print(f"wrote {table} and {raw}")
    return 0


def _model_arguments(p) -> None:
    p.add_argument("model", help="a training checkpoint directory (converted on the fly) or a Hugging Face folder")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--tokenizer", default=None,
                   help="for a checkpoint: the tokenizer file, if not the one its config.yaml names")


def register(subparsers) -> None:
    from mesh_hf.lm_eval_runner import PAPER_TASKS

    convert = subparsers.add_parser(
        "convert", help="to and from Hugging Face model folders",
        description="Convert training checkpoints to Hugging Face folders (transformers, lm-eval) and back.")
    sub = convert.add_subparsers(dest="convert_command", metavar="SUBCOMMAND", required=True)
    p = sub.add_parser(
        "hf", help="a checkpoint (any TP / PP / DP layout) -> a Hugging Face model folder",
        description="Writes config.json, generation_config.json, model.safetensors (sharded above "
                    "--max-shard-size, with an index), the tokenizer files and a README model card. Vanilla models "
                    "become transformers' GPTNeoXForCausalLM; recursive and MeSH models a MeshForCausalLM whose "
                    "code (modeling_mesh.py) ships in the folder: load with trust_remote_code=True. Tensors stream "
                    "one at a time; the folder appears only when complete.")
    p.add_argument("checkpoint", help="a checkpoint directory (runs/x/checkpoints/step0010000), or a run or "
                                      "checkpoints folder: its newest complete checkpoint")
    p.add_argument("out", help="the output folder (new or empty, unless --overwrite)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights dtype (default fp32)")
    p.add_argument("--max-shard-size", type=_size, default="5GB", help="split model.safetensors above this (5GB)")
    p.add_argument("--tokenizer", default=None, help="the tokenizer file, if not the one the checkpoint's "
                                                     "config.yaml names (it must have the same sha256)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=_convert_hf)

    p = sub.add_parser(
        "from-hf", help="a Hugging Face folder (GPT-NeoX / Pythia, or one `mesh convert hf` wrote) -> a checkpoint",
        description="Writes a step-0 training checkpoint (weights only; a fresh optimizer and LR schedule start "
                    "from it) with its config.yaml. A GPT-NeoX folder becomes a vanilla model with "
                    "model.scale_embeddings=false (GPT-NeoX does not scale embeddings), or with --split and "
                    "--variant a recursive model whose prelude, core and coda are initialised from the source "
                    "layers --layer-map names; routers and coefficients start from the model's own init.")
    p.add_argument("hf_dir", help="a folder with config.json and model.safetensors / pytorch_model.bin")
    p.add_argument("out", help="the checkpoint directory to write")
    p.add_argument("--layout", type=_layout, default=_layout("tensor=1"),
                   help="tensor=T,pipeline=P: TP shards to write and the layout the config starts with "
                        "(any layout loads the checkpoint; default tensor=1)")
    p.add_argument("--split", default=None, help="a recursive target split, e.g. 4+8R2+4 (GPT-NeoX sources)")
    p.add_argument("--variant", default=None, help="the target's variant with --split (default mesh)")
    p.add_argument("--layer-map", default=None,
                   help="with --split: source layers per block, e.g. prelude=0-3,core=4-11,coda=20-23 "
                        "(ranges A-B or single layers, joined by +; the core of an unshared 'x' split takes "
                        "L_core x N_loop layers, loop by loop)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=_convert_from_hf)

    p = subparsers.add_parser(
        "generate", help="generate text from a checkpoint or a Hugging Face folder",
        description="Greedy by default; --temperature > 0 samples (with --top-p). Prints the text and the "
                    "generation speed.")
    _model_arguments(p)
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute every step without the KV cache")
    p.set_defaults(func=_generate)

    evaluate = subparsers.add_parser("eval", help="perplexity and lm-eval-harness benchmarks",
                                     description="Evaluate a checkpoint or a Hugging Face folder.")
    sub = evaluate.add_subparsers(dest="eval_command", metavar="SUBCOMMAND", required=True)
    p = sub.add_parser(
        "ppl", help="sliding-window perplexity on megatron shards or jsonl text, per token and per byte",
        description="The documents are joined in order (each followed by the end-of-document token); windows "
                    "of --context tokens start every --stride tokens and each scores only tokens no earlier "
                    "window scored. Reports nats/token, perplexity and bits per byte (comparable across "
                    "tokenizers). --context seq_length+1 --stride seq_length matches training's validation.")
    _model_arguments(p)
    p.add_argument("--data", required=True, help="a megatron data prefix (P.bin/P.idx or its manifest) or a "
                                                 ".jsonl / .jsonl.zst file")
    p.add_argument("--field", default="text", help="the jsonl text field (default text)")
    p.add_argument("--context", type=int, default=None, help="window length (default: the model's context)")
    p.add_argument("--stride", type=int, default=None, help="window step (default: context / 2)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-documents", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.set_defaults(func=_eval_ppl)

    p = sub.add_parser(
        "lm-eval", help="lm-eval-harness tasks (the paper's list by default), results as markdown and JSON",
        description=f"Runs lm-eval-harness's hf model on the converted model. --tasks paper = {', '.join(PAPER_TASKS)} "
                    "(acc_norm for PIQA, HellaSwag, ARC and SciQ, acc for the others, as the paper). Their data "
                    "sets must be in the local Hugging Face cache unless --download; local task YAMLs come with "
                    "--include-path.")
    _model_arguments(p)
    p.add_argument("--tasks", default="paper", help="'paper' or task names joined by commas")
    p.add_argument("--num-fewshot", default="0,5", help="shot counts joined by commas (default 0,5)")
    p.add_argument("--include-path", default=None, help="a folder of local lm-eval task YAMLs")
    p.add_argument("--limit", type=float, default=None, help="items per task (for a quick look)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--download", action="store_true", help="let lm-eval download missing data sets")
    p.add_argument("--out", default="lm_eval_results", help="folder for lm_eval.md and lm_eval.json")
    p.set_defaults(func=_eval_lm_eval)
