"""Model configuration: the size, the layer split, the recurrence variant.

The layer split uses the paper's notation `L_pre + L_core R N_loop + L_coda`
(for example `4+8R2+4`: 4 prelude layers, an 8-layer core looped twice, 4 coda
layers; 24 layers of compute). A lowercase `x` instead of `R` (`4+8x2+4`) gives
each loop its own, unshared copy of the core block: the same program and compute,
no weight sharing (the paper's vanilla+mesh with variant mesh). A plain number
(`24`) is a vanilla, non-recursive stack. The split, the variant and the buffer
size live here and nowhere else; everything downstream reads the derived properties.

Every field is validated in `__post_init__`, so a bad config fails before any
tensor is allocated, with one line that names the field.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

SUPPLEMENTS = ("residual", "anchor", "anchor_emb")
"""What a fixed recurrence may add to f_core(h(t)): h(t), h0 (the prelude output) and h_emb
(the embeddings, the paper's anchor*)."""

LEARNED_COMBINATIONS = ("static_combination", "dynamic_combination")

VARIANTS = ("vanilla", "base", *SUPPLEMENTS, "mesh", *LEARNED_COMBINATIONS)
"""vanilla: non-recursive stack. base: h(t+1) = f_core(h(t)). A fixed recurrence adds a set of
supplements, written joined by '+' in this order: residual, anchor, anchor_emb, anchor+anchor_emb,
residual+anchor, residual+anchor+anchor_emb (the paper's Table 4) or any other non-empty set.
static_combination / dynamic_combination: h(t+1) = a1 f_core(h(t)) + a2 h0 + a3 h_emb with learned
coefficients per loop step (static: three scalars; dynamic: a linear map of h(t), per token).
mesh: the memory buffer with step-wise routers."""


def fixed_supplements(variant: str) -> tuple[str, ...] | None:
    """The supplements of a fixed-recurrence variant ('base' -> (), 'residual+anchor' -> ...);
    None for any other variant. ConfigError (one line) for an unknown or misordered name."""
    if variant == "base":
        return ()
    names = tuple(variant.split("+"))
    if not any(name in SUPPLEMENTS for name in names):
        return None
    unknown = [n for n in names if n not in SUPPLEMENTS]
    if unknown:
        raise ConfigError(
            f"model.variant={variant!r}: unknown supplement {unknown[0]!r}; supplements are "
            f"{', '.join(SUPPLEMENTS)}, joined by '+' (e.g. 'anchor+anchor_emb')"
        )
    canonical = tuple(n for n in SUPPLEMENTS if n in names)
    if names != canonical:
        raise ConfigError(
            f"model.variant={variant!r}: write each supplement once, in the order {'+'.join(SUPPLEMENTS)} "
            f"(here: {'+'.join(canonical)!r})"
        )
    return names

_RECURSIVE_SPLIT = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*([Rrx])\s*(-?\d+)\s*\+\s*(\d+)\s*$")
_PLAIN_SPLIT = re.compile(r"^\s*(\d+)\s*$")


class ConfigError(ValueError):
    """A config value is invalid. The message names the field and the fix."""


#: The seed range: numpy's ``RandomState`` (python, numpy and megatron's dataset shuffles) needs [0, 2**32 - 1].
SEED_RANGE = dict(ge=0, le=2**32 - 1)


def check_number(where: str, value: object, *, integer: bool = False, ge: float | None = None,
                 gt: float | None = None, le: float | None = None, lt: float | None = None,
                 note: str = "") -> None:
    """One-line ConfigError unless `value` is a finite number (an int when `integer`) in range.

    `where` names the field as a user writes it ("optim.lr"); ge/le are inclusive bounds, gt/lt
    exclusive ones; `note` is added in parentheses. A bool is not a number here. For example "optim.lr=nan must be a finite
    number > 0", "train.seed=-1 must be an integer in [0, 4294967295]".
    """
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = (is_number and (isinstance(value, int) or (not integer and math.isfinite(value)))
          and (ge is None or value >= ge) and (gt is None or value > gt)
          and (le is None or value <= le) and (lt is None or value < lt))
    if ok:
        return
    low = f"[{ge}" if ge is not None else f"({gt}" if gt is not None else None
    high = f"{le}]" if le is not None else f"{lt})" if lt is not None else None
    if low and high:
        bounds = f" in {low}, {high}"
    elif low:
        bounds = f" >= {ge}" if ge is not None else f" > {gt}"
    elif high:
        bounds = f" <= {le}" if le is not None else f" < {lt}"
    else:
        bounds = ""
    note = f" ({note})" if note else ""
    kind = "an integer" if integer else "a finite number"
    raise ConfigError(f"{where}={value!r} must be {kind}{bounds}{note}")


def check_finite_fields(section: str, config: object) -> None:
    """The catch-all behind the per-field ranges: no float of a config dataclass (or of a list
    field) may be NaN or infinite, so a new field that forgets its range check still cannot
    carry a non-finite value into training."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name, None)  # a derived (init=False) field may not be set yet
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{section}.{f.name}={value!r} must be a finite number")


@dataclass(frozen=True)
class LayerSplit:
    prelude: int
    core: int
    loops: int
    coda: int
    shared: bool = True
    """True (`R`): one core block applied N_loop times. False (`x`): N_loop unshared copies of
    the core block, one per loop (the paper's vanilla+mesh); same program, same compute."""

    @property
    def compute_depth(self) -> int:
        """Layers in the unrolled compute graph (what the init scaling uses)."""
        return self.prelude + self.core * self.loops + self.coda

    @property
    def core_copies(self) -> int:
        """Distinct core blocks: 1 when shared, N_loop when unshared (0 without a core)."""
        if not self.is_recursive:
            return 0
        return 1 if self.shared else self.loops

    @property
    def unique_core_layers(self) -> int:
        """Core layers with their own weights: L_core, or L_core * N_loop when unshared."""
        return self.core * self.core_copies

    @property
    def unique_layers(self) -> int:
        """Layers with their own weights."""
        return self.prelude + self.unique_core_layers + self.coda

    @property
    def is_recursive(self) -> bool:
        return self.core > 0

    def __str__(self) -> str:
        if not self.is_recursive:
            return str(self.prelude)
        return f"{self.prelude}+{self.core}{'R' if self.shared else 'x'}{self.loops}+{self.coda}"


def parse_layer_split(text: str | int) -> LayerSplit:
    """`"4+8R2+4"` -> LayerSplit(4, 8, 2, 4); `"4+8x2+4"` -> LayerSplit(4, 8, 2, 4, shared=False);
    `"24"` -> LayerSplit(24, 0, 0, 0)."""
    text = str(text)
    if m := _PLAIN_SPLIT.match(text):
        return LayerSplit(int(m.group(1)), 0, 0, 0)
    if m := _RECURSIVE_SPLIT.match(text):
        pre, core, kind, loops, coda = m.groups()
        return LayerSplit(int(pre), int(core), int(loops), int(coda), shared=kind in "Rr")
    raise ConfigError(
        f"model.layer_split={text!r} is not of the form L_pre+L_coreRN_loop+L_coda (a shared core, "
        "e.g. '4+8R2+4'), L_pre+L_corexN_loop+L_coda (unshared core copies, e.g. '4+8x2+4') "
        "or a plain layer count for vanilla (e.g. '24')"
    )


@dataclass
class ModelConfig:
    """A GPT-NeoX (Pythia-style) model, optionally recursive, optionally with MeSH."""

    # --- size -------------------------------------------------------------
    hidden_size: int = 768
    num_attention_heads: int = 12
    vocab_size: int = 50277
    """The tokenizer's vocabulary. The embedding is padded (see padded_vocab_size)."""
    seq_length: int = 2048
    ffn_hidden_size: int | None = None
    """Defaults to 4 * hidden_size (GPT-NeoX)."""
    make_vocab_size_divisible_by: int = 128
    """Pythia pads 50277 -> 50304 (a multiple of 128) for fast matmuls."""

    # --- depth and recurrence ---------------------------------------------
    layer_split: str = "12"
    num_layers: int | None = None
    """The declared compute depth; must equal L_pre + L_core * N_loop + L_coda.
    Optional, but configs state it so a typo in the split is caught."""
    variant: str = "vanilla"
    buffer_slots: int | None = None
    """MeSH buffer size B. Defaults to N_loop + 3 (the paper's choice)."""
    router_init_std: float | None = None
    """MeSH router weight init std. The paper leaves it open; default
    sqrt(2 / (5 * hidden_size)) (truncated normal), biases zero, which starts
    every router near-uniform over the slots. > 0 when set."""

    # --- GPT-NeoX architecture options --------------------------------------
    parallel_residual: bool = True
    """x + attn(ln1(x)) + mlp(ln2(x)); False gives the sequential pre-LN layer."""
    rotary_percent: float = 0.25
    """Share of each head's dims that get rotary embeddings, in (0, 1]."""
    rotary_base: int = 10000
    """Rotary frequency base (an integer >= 1)."""
    layernorm_epsilon: float = 1e-5
    """> 0."""
    scale_embeddings: bool = True
    """Multiply token embeddings by sqrt(hidden_size), as the paper's setup does."""
    untie_embeddings: bool = True
    init_method_std: float = 0.02
    """Std of the weight init (> 0); output projections use std / sqrt(2 * compute depth)."""
    hidden_dropout: float = 0.0
    """Dropout probabilities, each in [0, 1)."""
    attention_dropout: float = 0.0
    recompute: list[str] = field(default_factory=list)
    """Activation checkpointing: recompute these layers in backward instead of keeping
    their activations. Entries: "prelude", "core" (every loop), "core@K" (loop K
    only), "coda". Empty: keep everything."""
    init_seed: int = 1234
    """Each layer, the embedding, the head and the routers draw their initial weights
    from their own seed derived from this one, so initialisation does not depend on
    the parallel layout. In [0, 2**32 - 1], like train.seed."""

    # ----------------------------------------------------------------------
    split: LayerSplit = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._check_positive("hidden_size", "num_attention_heads", "vocab_size", "seq_length")
        self._check_numbers()
        if self.seq_length < 2:
            raise ConfigError(f"model.seq_length={self.seq_length} must be >= 2 (a token and the next one to predict)")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} does not divide "
                f"model.hidden_size={self.hidden_size}; pick a head count that divides it"
            )
        if self.variant not in VARIANTS and fixed_supplements(self.variant) is None:
            raise ConfigError(
                f"model.variant={self.variant!r} is unknown; choose one of {', '.join(VARIANTS)}, "
                "or supplements joined by '+' (e.g. 'anchor+anchor_emb')"
            )
        self.split = parse_layer_split(self.layer_split)
        self._check_split()
        self._check_buffer()
        rotary_dims = int(self.head_dim * self.rotary_percent)
        if rotary_dims < 2 or rotary_dims % 2:
            raise ConfigError(
                f"model.rotary_percent={self.rotary_percent} gives {rotary_dims} rotary dims of "
                f"head_dim={self.head_dim}; it must be an even number >= 2"
            )
        self._check_recompute()

    def _check_positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model.{name}={value!r} must be a positive integer")

    def _check_numbers(self) -> None:
        """The range of every numeric field on its own (rules between fields come after it)."""
        for name in ("ffn_hidden_size", "num_layers"):
            if getattr(self, name) is not None:
                check_number(f"model.{name}", getattr(self, name), integer=True, ge=1)
        check_number("model.make_vocab_size_divisible_by", self.make_vocab_size_divisible_by, integer=True, ge=1)
        check_number("model.rotary_base", self.rotary_base, integer=True, ge=1)
        check_number("model.init_seed", self.init_seed, integer=True, **SEED_RANGE)
        if self.router_init_std is not None:
            check_number("model.router_init_std", self.router_init_std, gt=0)
        for name in ("layernorm_epsilon", "init_method_std"):
            check_number(f"model.{name}", getattr(self, name), gt=0)
        check_number("model.rotary_percent", self.rotary_percent, gt=0, le=1)
        for name in ("hidden_dropout", "attention_dropout"):
            check_number(f"model.{name}", getattr(self, name), ge=0, lt=1)
        check_finite_fields("model", self)

    def _check_split(self) -> None:
        split = self.split
        if self.variant == "vanilla":
            if split.is_recursive:
                raise ConfigError(
                    f"model.layer_split={self.layer_split!r} is recursive but model.variant is "
                    f"'vanilla'; use a plain layer count such as '{split.compute_depth}'"
                )
        else:
            if not split.is_recursive:
                raise ConfigError(
                    f"model.variant={self.variant!r} needs a recursive model.layer_split such as "
                    f"'4+8R2+4' (or '4+8x2+4' for unshared core copies), got {self.layer_split!r}"
                )
            if split.loops < 1:
                raise ConfigError(
                    f"model.layer_split={self.layer_split!r} has N_loop={split.loops}; "
                    "N_loop must be >= 1"
                )
        if split.compute_depth < 1:
            raise ConfigError(f"model.layer_split={self.layer_split!r} has no layers")
        if self.num_layers is not None and self.num_layers != split.compute_depth:
            raise ConfigError(
                f"model.layer_split={self.layer_split!r} sums to {split.compute_depth} compute "
                f"layers but model.num_layers={self.num_layers}; fix one of the two"
            )

    def _check_buffer(self) -> None:
        if self.variant != "mesh":
            if self.buffer_slots is not None:
                raise ConfigError(
                    f"model.buffer_slots={self.buffer_slots} is set but model.variant is "
                    f"{self.variant!r}; buffer_slots only applies to 'mesh'"
                )
            return
        if self.buffer_slots is None:
            self.buffer_slots = self.split.loops + 3
        if not isinstance(self.buffer_slots, int) or self.buffer_slots < 2:
            raise ConfigError(
                f"model.buffer_slots={self.buffer_slots!r} must be an integer >= 2 for mesh "
                "(slot 0 holds the embeddings; at least one more slot is needed for writes)"
            )

    def _check_recompute(self) -> None:
        loops = self.split.loops
        for entry in self.recompute:
            block, _, loop = str(entry).partition("@")
            ok = block in ("prelude", "core", "coda") and (
                not loop or (block == "core" and loop.isdigit() and int(loop) < loops)
            )
            if not ok:
                raise ConfigError(
                    f"model.recompute entry {entry!r} is not one of prelude, core, coda or core@K "
                    f"with 0 <= K < N_loop={loops}"
                )

    def recomputes(self, block: str, loop: int | None) -> bool:
        """Whether a layer of `block` (in loop `loop`, for the core) is recomputed in backward."""
        return block in self.recompute or (loop is not None and f"{block}@{loop}" in self.recompute)

    # --- derived ------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def padded_vocab_size(self) -> int:
        multiple = self.make_vocab_size_divisible_by
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    @property
    def compute_depth(self) -> int:
        return self.split.compute_depth

    @property
    def router_std(self) -> float:
        if self.router_init_std is not None:
            return self.router_init_std
        return math.sqrt(2.0 / (5.0 * self.hidden_size))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown model field(s) {', '.join('model.' + u for u in unknown)}; "
                f"known fields: {', '.join(sorted(known))}"
            )
        return cls(**values)


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML file that must hold a mapping; every failure is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must contain a YAML mapping, got {type(data).__name__}")
    return data
