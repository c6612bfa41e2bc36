"""`mesh ckpt list | verify | prune | convert`: look after checkpoints without starting a run.

    mesh ckpt list runs/x/checkpoints
    mesh ckpt verify runs/x/checkpoints            # every checkpoint's sha256 (exit 1 on damage)
    mesh ckpt prune runs/x/checkpoints --set-aside # remove set-aside (replaced) directories
    mesh ckpt convert runs/x/checkpoints/step0001000 --to fp32 model.pt
    mesh ckpt convert runs/x/checkpoints/step0001000 --to layout --tensor 2 out/step0001000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

from pretrain.checkpoint import format as ckpt


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _roots_and_checkpoints(path: Path):
    if (path / ckpt.META).exists() or ckpt.is_step_dir_name(path.name):
        return [ckpt.inspect_dir(path)]
    if not path.is_dir():
        raise ckpt.CheckpointError(f"{path}: no such directory")
    return ckpt.list_checkpoints(path)


def _list(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    infos = _roots_and_checkpoints(root)
    if not infos:
        print(f"{root}: no checkpoints")
        return 0
    latest_file = root / ckpt.LATEST
    latest = latest_file.read_text().strip() if latest_file.is_file() else None
    rows = [("name", "step", "state", "size", "layout", "saved", "reason")]
    for info in infos:
        state = "complete" if info.complete else f"INCOMPLETE: {info.problem}"
        rows.append((
            info.name + (" (latest)" if info.name == latest else ""),
            str(info.step),
            state,
            _human(info.size_bytes()),
            info.layout(),
            info.meta.created if info.meta else "-",
            (info.meta.reason if info.meta else "") or "-",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    aside = ckpt.list_set_aside(root)
    if aside:
        total = sum(a.size_bytes() for a in aside)
        print(f"set aside: {len(aside)} director{'y' if len(aside) == 1 else 'ies'} ({', '.join(a.path.name for a in aside)}), "
              f"{_human(total)}; `mesh ckpt prune {root} --set-aside` removes them")
    return 0


def _prune(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    if not root.is_dir():
        raise ckpt.CheckpointError(f"{root}: no such directory")
    if args.keep_last is None and not args.set_aside:
        raise ckpt.CheckpointError("nothing to prune: give --keep-last N (with --keep-every, --log-spaced) "
                                   "and/or --set-aside")
    removed = []
    if args.keep_last is not None:
        newest = max((i.step for i in ckpt.list_checkpoints(root) if i.complete), default=-1)
        removed += ckpt.prune(root, args.keep_last, args.keep_every, args.log_spaced, protect=newest)
    if args.set_aside:
        removed += ckpt.prune_set_aside(root, keep=0)
    print(f"{root}: removed {len(removed)}" + (f": {', '.join(removed)}" if removed else ""))
    return 0


def _verify(args: argparse.Namespace) -> int:
    infos = _roots_and_checkpoints(Path(args.dir))
    bad = 0
    for info in infos:
        if not info.complete and (info.path / ckpt.META).exists():  # metadata there but unusable: damage
            bad += 1
            print(f"{info.name}: DAMAGED\n  {info.problem}")
            continue
        if not info.complete:
            print(f"{info.name}: incomplete ({info.problem}); never loaded")
            continue
        started = time.perf_counter()
        problems = ckpt.verify(info.path, checksums=not args.sizes_only)
        files = len(info.meta.files)
        if problems:
            bad += 1
            print(f"{info.name}: DAMAGED")
            for problem in problems:
                print(f"  {problem}")
        else:
            what = "sizes" if args.sizes_only else "sha256"
            print(f"{info.name}: ok ({files} files, {what} checked in {time.perf_counter() - started:.1f} s)")
    return 1 if bad else 0


def _convert(args: argparse.Namespace) -> int:
    import torch

    source = Path(args.checkpoint)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; choose another output or pass --overwrite")
    problems = ckpt.verify(source, checksums=True)
    if problems:
        raise ckpt.CheckpointError(f"{problems[0]} (run `mesh ckpt verify {source}`)")
    meta = ckpt.read_meta(source)
    if args.to == "fp32":
        tensors = ckpt.consolidate(source, with_optimizer=args.with_optimizer)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({k.replace("#", "."): v.contiguous() for k, v in tensors.items()}, str(out),
                      metadata={"step": str(meta.step), "model": json.dumps(meta.model)})
        else:
            torch.save({"step": meta.step, "model_config": meta.model, "state_dict": tensors}, out)
        total = sum(v.numel() for k, v in tensors.items() if "#" not in k)
        print(f"wrote {out}: {len(tensors)} tensors, {total:,} parameters (fp32) from {source}")
        return 0
    written = convert_layout(source, out, args.tensor, overwrite=args.overwrite)
    print(f"wrote {written}: TP {args.tensor} shards of {source} (weights and optimizer state; "
          "RNG states are not carried over, a run resuming from it re-seeds them)")
    return 0


def convert_layout(source: Path, out: Path, tensor: int, overwrite: bool = False) -> Path:
    """Rewrites a checkpoint's state files as ``tensor`` TP shards (offline, one process).

    The loader reshards by itself at start-up; this is for sharing or for
    inspecting a checkpoint at the layout a run will use.
    """
    meta = ckpt.read_meta(source)
    tensors = ckpt.consolidate(source, with_optimizer=True)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "state").mkdir(parents=True)
    files, index = {}, {}
    shards: list[dict] = [{} for _ in range(tensor)]
    for name, entry in meta.tensors.items():
        dim = entry.tp_dim
        states = {"param": tensors[name], **{k: tensors[f"{name}#{k}"] for k in ckpt.ADAM_KEYS
                                              if f"{name}#{k}" in tensors}}
        if dim is not None and entry.shape[dim] % tensor:
            raise ckpt.CheckpointError(f"tensor {name!r} dimension {dim} ({entry.shape[dim]}) "
                                       f"does not split into {tensor} TP shards")
        ranks = range(tensor) if dim is not None else [0]
        for r in ranks:
            shards[r][name] = {k: (v.chunk(tensor, dim)[r].clone() if dim is not None else v)
                               for k, v in states.items()}
        index[name] = ckpt.TensorRecord(shape=entry.shape, tp_dim=dim, tp_size=tensor if dim is not None else 1,
                                        shards={str(r): ckpt.state_file_name(r, 0, 0) for r in ranks})
    for r, shard in enumerate(shards):
        rel = ckpt.state_file_name(r, 0, 0)
        files[rel] = ckpt.save_file(shard, tmp / rel)
    config = (source / "config.yaml").read_bytes()
    (tmp / "config.yaml").write_bytes(config)
    files["config.yaml"] = ckpt.bytes_record(config)
    new_meta = dataclasses.replace(meta, tensors=index, files=files,
                                   layout={**meta.layout, "tensor": tensor, "pipeline": 1, "data": 1},
                                   converted_from=str(source), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    ckpt.atomic_write_text(tmp / ckpt.META, new_meta.to_json())
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "ckpt", help="list, verify, prune and convert training checkpoints",
        description="Inspect and convert the checkpoints `mesh train` writes (one directory per step, "
                    "complete once its meta.json exists).",
    )
    sub = parser.add_subparsers(dest="ckpt_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser("list", help="steps, completeness, size and layout of each checkpoint",
                       description="One line per checkpoint directory under DIR (or DIR itself).")
    p.add_argument("dir", help="a checkpoint root (e.g. runs/x/checkpoints) or one checkpoint")
    p.set_defaults(func=_list)

    p = sub.add_parser("verify", help="check every file's size and sha256 against the metadata",
                       description="Exit code 1 if any complete checkpoint is damaged.")
    p.add_argument("dir", help="a checkpoint root or one checkpoint")
    p.add_argument("--sizes-only", action="store_true", help="skip the sha256 (fast, catches truncation only)")
    p.set_defaults(func=_verify)

    p = sub.add_parser(
        "prune", help="remove checkpoints a retention policy drops, and set-aside directories",
        description="--keep-last N [--keep-every M] [--log-spaced]: keep what that policy keeps (the newest "
                    "complete checkpoint always stays) and remove the rest, with interrupted saves older than "
                    "the newest complete one. --set-aside: remove every stepN.replaced-* / stepN.interrupted-* "
                    "directory (checkpoints set aside instead of being overwritten).",
    )
    p.add_argument("dir", help="a checkpoint root (e.g. runs/x/checkpoints)")
    p.add_argument("--keep-last", type=int, default=None, metavar="N")
    p.add_argument("--keep-every", type=int, default=0, metavar="M")
    p.add_argument("--log-spaced", action="store_true", help="also keep steps 1, 2, 4, 8, ...")
    p.add_argument("--set-aside", action="store_true", help="remove all set-aside directories")
    p.set_defaults(func=_prune)

    p = sub.add_parser(
        "convert", help="to one fp32 state dict, or to another tensor-parallel layout",
        description="--to fp32 OUT(.pt|.safetensors): all weights, TP shards merged, fp32, under the "
                    "model's layout-invariant names (--with-optimizer adds the Adam moments as "
                    "NAME#exp_avg / NAME#exp_avg_sq). --to layout --tensor T OUT: the same checkpoint "
                    "with T TP shards per tensor. Training resumes at any layout without converting; "
                    "this is for sharing and inspection.",
    )
    p.add_argument("checkpoint", help="one checkpoint directory (e.g. runs/x/checkpoints/step0001000)")
    p.add_argument("--to", choices=("fp32", "layout"), required=True)
    p.add_argument("--tensor", type=int, default=1, help="TP size for --to layout (default 1)")
    p.add_argument("--with-optimizer", action="store_true", help="--to fp32: include the Adam moments")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("out", help="output file (--to fp32) or directory (--to layout)")
    p.set_defaults(func=_convert)
