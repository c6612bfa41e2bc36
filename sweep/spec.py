"""The sweep file: a grid of training runs for a scaling-law study, resolved into run configs.

    sweep = load_sweep("configs/sweeps/example.yaml")
    for run in sweep.runs:
        run.run_id            # "d32.mesh.t20n.s1": size . variant . budget . seed
        run.run_dir           # <sweep root>/<run_id>
        run.config            # the resolved, validated RunConfig (logging.run_dir = run_dir)
        run.config_path, run.overrides   # what `mesh train CONFIG overrides...` takes

A sweep file (docs/sweeps.md has the full format) holds:

    root: runs/sweeps/example        # run folders go to <root>/<run_id> (default runs/sweeps/<file stem>)
    grid:
      sizes:                         # a configs/<name>/ folder, a config file, or {name, config, overrides}
        - {name: d32, config: configs/demo.yaml, overrides: [model.hidden_size=32]}
      variants: [base, mesh]         # or {name, overrides}; default: each config's own variant
      tokens: [20N, 2M]              # tokens-per-parameter ratios (N = non-embedding parameters) or counts
      seeds: [1]                     # default: each config's train.seed
    rules:                           # values that depend on the size
      optim.lr: {d32: 3.0e-3}                                         # a table over every size
      train.global_batch_size: {power_law: {scale: 16, exponent: 0.5, reference: 1.0e6}}  # scale (N/ref)^exp
    overrides: [train.eval_interval=20]   # plain overrides for every run
    slurm: {...}                     # resources, kept raw here (the SLURM launcher validates them)

Overrides apply in this order, each on top of the one before: the size's config file, the size's
overrides, the variant's, the sweep's plain overrides, the rules, then the budget's train.steps,
the seed and logging.run_dir. A run's budget is rounded up to whole optimizer steps
(global_batch_size x seq_length tokens each); `tokens` is what the run trains on.

Every problem is one ConfigError naming the file and the key path
("sweep.yaml: grid.tokens[1]='20X' ...").
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from mesh_model.config import ConfigError, ModelConfig, read_yaml_mapping
from mesh_model.flops import flops_per_token
from pretrain.config import RunConfig, load_config

PROJECT_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
"""Size names (grid.sizes: [pythia-160m]) are folders here, or under ./configs of the current directory."""

_TOP_LEVEL = ("name", "root", "grid", "rules", "overrides", "slurm", "ratio_parameters")
_GRID = ("sizes", "variants", "tokens", "seeds")
_RATIO = re.compile(r"^\s*(\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)\s*[Nn]\s*$")
_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)\s*([kKmMgGbBtT]?)\s*$")
_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9, "t": 1e12}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+\-]*$")


@dataclass(frozen=True)
class Budget:
    """A token budget: an absolute count, or a ratio of tokens per parameter (Chinchilla's 20 N)."""

    tokens: Optional[int] = None
    per_parameter: Optional[float] = None

    @property
    def label(self) -> str:
        """The budget's part of a run id: t20n (ratio), t2m / t500k / t1.5b (count)."""
        if self.per_parameter is not None:
            return f"t{_compact(self.per_parameter)}n"
        for suffix, scale in (("t", 1e12), ("b", 1e9), ("m", 1e6), ("k", 1e3)):
            if self.tokens >= scale:
                return f"t{_compact(self.tokens / scale)}{suffix}"
        return f"t{self.tokens}"

    def requested_tokens(self, parameters: int) -> int:
        if self.per_parameter is not None:
            return math.ceil(self.per_parameter * parameters)
        return self.tokens


@dataclass(frozen=True)
class Rule:
    """A config value as a function of the size: a table keyed by size name, or a power law
    scale * (N / reference) ** exponent in the non-embedding parameters N."""

    key: str
    table: Optional[dict] = None
    scale: float = 0.0
    exponent: float = 0.0
    reference: float = 1.0

    def value(self, size: str, parameters: int) -> Any:
        if self.table is not None:
            return self.table[size]
        # 4 significant digits: the value lands in the resolved config and the overrides, and a
        # readable 3.552e-3 says as much as 0.003552094236794823.
        return float(f"{self.scale * (parameters / self.reference) ** self.exponent:.4g}")


@dataclass(frozen=True)
class SweepRun:
    run_id: str
    run_dir: Path
    config: RunConfig
    config_path: Path
    """The size's config file; `mesh train config_path *overrides` trains this run."""
    overrides: list[str]
    size: str
    variant: str
    """The grid's variant label (a configs/<size>/ file name or the variant name), what the fit groups by."""
    seed: int
    budget: str
    """The budget's label (t20n, t2m)."""
    params_non_embedding: int
    params_total: int
    tokens: int
    """Tokens trained: steps x global_batch_size x seq_length (the budget rounded up to whole steps)."""
    steps: int
    flops_per_token: int
    """F_token (mesh_model/flops.py): forward + backward FLOPs per token."""

    @property
    def flops(self) -> int:
        """Total training FLOPs: F_token x tokens."""
        return self.flops_per_token * self.tokens

    @property
    def tokens_per_step(self) -> int:
        return self.config.train.global_batch_size * self.config.model.seq_length


@dataclass(frozen=True)
class Sweep:
    name: str
    path: Path
    root: Path
    runs: list[SweepRun]
    slurm: dict
    """The raw `slurm:` section (resources); the SLURM launcher validates it."""

    def run(self, run_id: str) -> SweepRun:
        for run in self.runs:
            if run.run_id == run_id:
                return run
        raise ConfigError(f"{self.path}: no run {run_id!r} in this sweep; runs: {', '.join(r.run_id for r in self.runs)}")


# ----------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class _Size:
    name: str
    where: str  # the key path, for errors
    folder: Optional[Path]  # a configs/<name>/ folder: the variant picks the file
    config: Optional[Path]  # a single config file: the variant is an override
    overrides: tuple[str, ...]
    seeds: tuple[int, ...] = ()  # this size's own seeds, in place of grid.seeds (fewer at larger sizes)


@dataclass(frozen=True)
class _Variant:
    name: str
    overrides: tuple[str, ...]
    where: str


def load_sweep(path: str | Path, root: Optional[str | Path] = None) -> Sweep:
    """Reads and resolves a sweep file; `root` replaces the file's `root:`. ConfigError (one line,
    naming the file and the key) for anything that would not train."""
    path = Path(path)
    spec = read_yaml_mapping(path)
    _Reader(path).check_keys(spec, _TOP_LEVEL, "")
    return _Reader(path).sweep(spec, root)


class _Reader:
    def __init__(self, path: Path):
        self.path = path
        self._param_cache: dict[str, tuple[int, int]] = {}

    def error(self, where: str, message: str) -> ConfigError:
        return ConfigError(f"{self.path}: {where}: {message}")

    def check_keys(self, mapping: dict, known: tuple[str, ...], where: str) -> None:
        unknown = sorted(set(mapping) - set(known))
        if unknown:
            at = f"{where}." if where else ""
            raise self.error(f"{at}{unknown[0]}", f"unknown key; known keys{' of ' + where if where else ''}: "
                                                  f"{', '.join(known)}")

    # --- the file's sections ------------------------------------------------------

    def sweep(self, spec: dict, root_override: Optional[str | Path]) -> Sweep:
        name = str(spec.get("name") or self.path.stem)
        root = Path(root_override or spec.get("root") or Path("runs") / "sweeps" / self.path.stem)
        grid = spec.get("grid")
        if not isinstance(grid, dict) or not grid:
            raise self.error("grid", "missing or empty; declare grid.sizes and grid.tokens (docs/sweeps.md)")
        self.check_keys(grid, _GRID, "grid")
        sizes = [self.size(entry, f"grid.sizes[{i}]") for i, entry in enumerate(self.nonempty_list(grid, "sizes"))]
        variants = [self.variant(entry, f"grid.variants[{i}]")
                    for i, entry in enumerate(self.optional_list(grid, "variants"))] or [None]
        budgets = [self.budget(entry, f"grid.tokens[{i}]") for i, entry in enumerate(self.nonempty_list(grid, "tokens"))]
        seeds = [self.seed(entry, f"grid.seeds[{i}]") for i, entry in enumerate(self.optional_list(grid, "seeds"))] or [None]
        self.unique([s.name for s in sizes], "grid.sizes")
        self.unique([v.name for v in variants if v], "grid.variants")
        self.unique([b.label for b in budgets], "grid.tokens")
        self.unique(seeds, "grid.seeds")
        plain = self.overrides(spec.get("overrides"), "overrides")
        rules = self.rules(spec.get("rules"), sizes)
        ratio_of = spec.get("ratio_parameters", "non_embedding")
        if ratio_of not in ("non_embedding", "total"):
            raise self.error("ratio_parameters", f"{ratio_of!r} must be non_embedding or total "
                                                 "(what N means in a budget like 20N)")
        slurm = spec.get("slurm") or {}
        if not isinstance(slurm, dict):
            raise self.error("slurm", "must be a mapping of resources (nodes, gpus_per_node, ...)")

        runs = []
        for size in sizes:
            for variant, budget, seed in itertools.product(variants, budgets, size.seeds or seeds):
                runs.append(self.run(root, size, variant, budget, seed, plain, rules, ratio_of))
        self.unique([r.run_id for r in runs], "the grid's run ids")
        return Sweep(name=name, path=self.path, root=root, runs=runs, slurm=dict(slurm))

    def nonempty_list(self, grid: dict, key: str) -> list:
        values = self.optional_list(grid, key)
        if not values:
            raise self.error(f"grid.{key}", "is empty; the grid needs at least one entry here")
        return values

    def optional_list(self, grid: dict, key: str) -> list:
        values = grid.get(key)
        if values is None:
            return []
        if not isinstance(values, list):
            values = [values]
        return values

    def unique(self, values: list, where: str) -> None:
        seen = set()
        for value in values:
            if value in seen:
                raise self.error(where, f"{value!r} appears twice; every grid point needs its own run id")
            seen.add(value)

    def find_file(self, text: str, where: str) -> Path:
        """A config path: relative to the current directory, else to the sweep file's folder."""
        candidates = [Path(text)] if Path(text).is_absolute() else [Path(text), self.path.parent / text]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise self.error(where, f"config file {text!r} not found (looked in {', '.join(map(str, candidates))})")

    def size(self, entry: Any, where: str) -> _Size:
        if isinstance(entry, str):
            for base in (Path("configs"), PROJECT_CONFIGS):
                if "/" not in entry and (base / entry).is_dir():
                    return _Size(entry, where, base / entry, None, ())
            if entry.endswith((".yaml", ".yml")):
                config = self.find_file(entry, where)
                return _Size(self.safe_name(config.stem, where), where, None, config, ())
            raise self.error(where, f"{entry!r} is neither a folder under configs/ (a size name such as "
                                    "pythia-160m) nor a .yaml config file")
        if not isinstance(entry, dict):
            raise self.error(where, "must be a size name, a config file or {name, config, overrides}")
        self.check_keys(entry, ("name", "config", "overrides", "seeds"), where)
        if "config" not in entry:
            raise self.error(f"{where}.config", "missing; name the size's config file or configs/ folder")
        base = self.size(entry["config"], f"{where}.config")
        name = self.safe_name(str(entry.get("name") or base.name), f"{where}.name")
        seeds = [self.seed(seed, f"{where}.seeds[{i}]") for i, seed in enumerate(self.optional_list(entry, "seeds"))]
        self.unique(seeds, f"{where}.seeds")
        return _Size(name, where, base.folder, base.config,
                     self.overrides(entry.get("overrides"), f"{where}.overrides"), tuple(seeds))

    def variant(self, entry: Any, where: str) -> _Variant:
        if isinstance(entry, str):
            return _Variant(self.safe_name(entry, where), (), where)
        if not isinstance(entry, dict) or "name" not in entry:
            raise self.error(where, "must be a variant name or {name, overrides}")
        self.check_keys(entry, ("name", "overrides"), where)
        return _Variant(self.safe_name(str(entry["name"]), f"{where}.name"),
                        self.overrides(entry.get("overrides"), f"{where}.overrides"), where)

    def safe_name(self, text: str, where: str) -> str:
        if not _SAFE_NAME.match(text):
            raise self.error(where, f"{text!r} must be a name of letters, digits, '_', '-' or '+' "
                                    "(it becomes part of the run id and folder)")
        return text

    def budget(self, entry: Any, where: str) -> Budget:
        if isinstance(entry, dict):
            self.check_keys(entry, ("tokens_per_parameter",), where)
            entry = f"{entry.get('tokens_per_parameter')}N"
        if isinstance(entry, (int, float)) and not isinstance(entry, bool):
            count = float(entry)
        elif isinstance(entry, str) and _RATIO.match(entry):
            ratio = float(_RATIO.match(entry).group(1))
            if not ratio > 0:
                raise self.error(where, f"{entry!r}: the tokens-per-parameter ratio must be > 0")
            return Budget(per_parameter=ratio)
        elif isinstance(entry, str) and _COUNT.match(entry):
            number, suffix = _COUNT.match(entry).groups()
            count = float(number) * _SUFFIX[suffix.lower()]
        else:
            raise self.error(where, f"{entry!r} is not a token budget; write a count (2000000, 2M, 1.5e9) "
                                    "or a tokens-per-parameter ratio (20N)")
        if not (math.isfinite(count) and count >= 1):
            raise self.error(where, f"{entry!r}: a token budget must be at least 1 token")
        return Budget(tokens=int(round(count)))

    def seed(self, entry: Any, where: str) -> int:
        if not isinstance(entry, int) or isinstance(entry, bool) or not 0 <= entry <= 2**32 - 1:
            raise self.error(where, f"{entry!r} must be an integer seed in [0, 4294967295]")
        return entry

    def overrides(self, entry: Any, where: str) -> tuple[str, ...]:
        """A list of "section.field=value" strings or a mapping {section.field: value}."""
        if entry is None:
            return ()
        if isinstance(entry, dict):
            return tuple(f"{key}={_yaml_value(value)}" for key, value in entry.items())
        if not isinstance(entry, list) or not all(isinstance(item, str) and "=" in item for item in entry):
            raise self.error(where, "must be a list of section.field=value strings or a mapping {section.field: value}")
        return tuple(entry)

    def rules(self, entry: Any, sizes: list[_Size]) -> list[Rule]:
        if entry is None:
            return []
        if not isinstance(entry, dict):
            raise self.error("rules", "must map a config key (optim.lr) to a table over the sizes or {power_law: ...}")
        names = [s.name for s in sizes]
        rules = []
        for key, value in entry.items():
            where = f"rules.{key}"
            if not isinstance(key, str) or key.count(".") != 1:
                raise self.error(where, "a rule's key is a config field, section.field (e.g. optim.lr)")
            if isinstance(value, dict) and "power_law" in value:
                self.check_keys(value, ("power_law",), where)
                law = value["power_law"]
                if not isinstance(law, dict):
                    raise self.error(f"{where}.power_law", "must be {scale, exponent, reference}")
                self.check_keys(law, ("scale", "exponent", "reference"), f"{where}.power_law")
                numbers = {k: law.get(k, default) for k, default in (("scale", None), ("exponent", 0.0), ("reference", 1.0))}
                for k, v in numbers.items():
                    numbers[k] = _number(v)
                    if numbers[k] is None:
                        raise self.error(f"{where}.power_law.{k}", f"{v!r} must be a finite number")
                if numbers["reference"] <= 0:
                    raise self.error(f"{where}.power_law.reference", "must be > 0 (parameters)")
                rules.append(Rule(key, scale=float(numbers["scale"]), exponent=float(numbers["exponent"]),
                                  reference=float(numbers["reference"])))
            elif isinstance(value, dict):
                missing = [n for n in names if n not in value]
                extra = [str(k) for k in value if k not in names]
                if extra:
                    raise self.error(f"{where}.{extra[0]}", f"is not a size of the grid; sizes: {', '.join(names)}")
                if missing:
                    raise self.error(where, f"has no value for size {missing[0]!r}; give every size of the grid one")
                rules.append(Rule(key, table=dict(value)))
            else:
                raise self.error(where, "must be a table {size: value} or {power_law: {scale, exponent, reference}}; "
                                        "a value for every size is a plain override")
        return rules

    # --- one grid point -----------------------------------------------------------

    def run(self, root: Path, size: _Size, variant: Optional[_Variant], budget: Budget, seed: Optional[int],
            plain: tuple[str, ...], rules: list[Rule], ratio_of: str) -> SweepRun:
        where = f"{size.where}" + (f" x {variant.where}" if variant else "")
        config_path = size.config
        overrides = list(size.overrides)
        if size.folder is not None:
            label = variant.name if variant else None
            if label is None:
                raise self.error(size.where, f"size {size.name!r} is a configs/ folder: grid.variants must name "
                                             f"its files ({', '.join(sorted(p.stem for p in size.folder.glob('*.yaml')))})")
            config_path = size.folder / f"{label}.yaml"
            if not config_path.is_file():
                raise self.error(variant.where, f"{size.folder} has no {label}.yaml; variants there: "
                                                f"{', '.join(sorted(p.stem for p in size.folder.glob('*.yaml')))}")
            overrides += variant.overrides
        elif variant is not None:
            overrides += list(variant.overrides) or self.variant_overrides(config_path, overrides, variant)

        overrides += plain
        base = self.resolve(config_path, overrides, where)
        label = variant.name if variant else self.safe_name(base.model.variant, f"{config_path}: model.variant")
        non_embedding, total = self.parameters(base.model)
        for rule in rules:
            value = rule.value(size.name, non_embedding)
            overrides.append(f"{rule.key}={_yaml_value(value, integer=self.is_integer_field(rule.key, where))}")
        seed = base.train.seed if seed is None else seed
        run_id = f"{size.name}.{label}.{budget.label}.s{seed}"
        run_dir = root / run_id
        sized = self.resolve(config_path, overrides, f"{where} (rules)")
        tokens_per_step = sized.train.global_batch_size * sized.model.seq_length
        requested = budget.requested_tokens(non_embedding if ratio_of == "non_embedding" else total)
        steps = max(1, math.ceil(requested / tokens_per_step))
        overrides += [f"train.steps={steps}", f"train.seed={seed}", f"logging.run_dir={run_dir}"]
        config = self.resolve(config_path, overrides, f"{where} (budget {budget.label})")
        return SweepRun(run_id=run_id, run_dir=run_dir, config=config, config_path=config_path,
                        overrides=overrides, size=size.name, variant=label, seed=seed, budget=budget.label,
                        params_non_embedding=non_embedding, params_total=total, tokens=steps * tokens_per_step,
                        steps=steps, flops_per_token=flops_per_token(config.model).total)

    def variant_overrides(self, config_path: Path, overrides: list[str], variant: _Variant) -> list[str]:
        """A variant name on a single config file sets model.variant; `vanilla` on a recursive
        split also turns the split into the plain stack of the same compute depth."""
        extra = [f"model.variant={variant.name}"]
        if variant.name == "vanilla":
            model = self.resolve(config_path, overrides, variant.where).model
            if model.split.is_recursive:
                extra.append(f"model.layer_split='{model.split.compute_depth}'")
        return extra

    def resolve(self, config_path: Path, overrides: list[str], where: str) -> RunConfig:
        try:
            return load_config(config_path, overrides)
        except ConfigError as err:
            raise self.error(where, f"{config_path}: {err}") from None

    def is_integer_field(self, key: str, where: str) -> bool:
        import dataclasses
        import typing

        section, name = key.split(".")
        hints = typing.get_type_hints(RunConfig)
        if section not in hints:
            raise self.error(f"rules.{key}", f"unknown config section {section!r}")
        cls = hints[section]
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        if name not in fields:
            raise self.error(f"rules.{key}", f"unknown field; {section} fields: {', '.join(sorted(fields))}")
        return typing.get_type_hints(cls)[name] is int

    def parameters(self, model: ModelConfig) -> tuple[int, int]:
        """(non-embedding, total), counted on the real model built on the meta device; cached per model."""
        from mesh_model.params import report_for

        key = repr(sorted(model.to_dict().items()))
        if key not in self._param_cache:
            report = report_for(model)
            self._param_cache[key] = (report.non_embedding, report.total)
        return self._param_cache[key]


def _number(value: Any) -> Optional[float]:
    """A finite number, also from a string: PyYAML reads 1.0e5 (no exponent sign) as a string."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _compact(value: float) -> str:
    """20.0 -> '20', 1.5 -> '1.5', 0.25 -> '0.25' (for run ids)."""
    return f"{value:.6g}".replace("+", "")


def _yaml_value(value: Any, integer: bool = False) -> str:
    """A value as the right-hand side of a dotted override (parsed back with yaml.safe_load)."""
    if integer and isinstance(value, float):
        value = int(round(value))
    if isinstance(value, float):
        return repr(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[:-4].strip() if text.endswith("\n...") else text
