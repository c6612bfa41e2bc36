"""`mesh sweep fit`: scaling laws fitted to a sweep's losses, with bootstrap intervals and plots.

Two laws per variant, N the non-embedding parameters and D the training tokens:

    L(N)    = E + A / N^alpha                   on each size's largest budget
    L(N, D) = E + A / N^alpha + B / D^beta      when every size has at least two budgets

With only two sizes, L(N)'s three coefficients are not determined; the fit is then the pure power
law L(N) = A / N^alpha (E = 0: a straight line through the two sizes on log-log axes), named
"A/N^alpha" in the report, which says so. It is a slope between two points, not a scaling law.

The method is Chinchilla's approach 3 (Hoffmann et al. 2022, "Training Compute-Optimal Large
Language Models", appendix D.2) as refitted by Besiroglu et al. 2024 ("Chinchilla Scaling: A
replication attempt"): in log space, with E = exp(e), A = exp(a), B = exp(b),

    log L_hat = LSE(a - alpha log N, b - beta log D, e)

and the objective is the Huber loss (delta 1e-3) of log L_hat - log L, summed over the points:
robust to a few outlying runs, and the log makes small and large losses count alike. scipy's
L-BFGS-B starts from every point of a grid over (a, b, e, alpha, beta) (the ranges of
Hoffmann et al.: a, b in [0, 25], e in [-1, 1], alpha, beta in [0, 2]) and the best end point is
kept. The objective is divided by delta^2 (the minimiser is unchanged) so that its values and
gradients are of order one and L-BFGS's stopping tests do not end it early (Besiroglu et al.
found the original fit had stopped short of the optimum).

Intervals: runs are resampled with replacement (numpy, a fixed seed) and each resample refitted,
starting from the full fit's best few end points; the 2.5 and 97.5 percentiles of each
coefficient give its 95% interval.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from scipy.optimize import minimize

from mesh_model.config import ConfigError

REQUIRED = ("variant", "parameters", "tokens", "loss")

LAW_N = "L(N)"
LAW_ND = "L(N,D)"
LAW_POWER = "A/N^alpha"  # L(N) without E: what two sizes can determine


@dataclass(frozen=True)
class FitOptions:
    bootstrap: int = 200
    """Bootstrap resamples for the intervals (0: no intervals)."""
    seed: int = 0
    huber_delta: float = 1e-3
    grid_points: int = 3
    """Starting values per coefficient; the start grid has grid_points^(3 or 5) points."""
    all_points: bool = False
    """Fit every row (intermediate evaluations too), not only the final ones."""
    restarts: int = 2
    """A bootstrap refit starts from this many of the full fit's best distinct end points (a
    resample's optimum is near the full fit's, so few iterations each)."""
    confidence: float = 0.95

    def validate(self) -> "FitOptions":
        if not isinstance(self.bootstrap, int) or self.bootstrap < 0:
            raise ConfigError(f"--bootstrap={self.bootstrap} must be an integer >= 0")
        if not isinstance(self.grid_points, int) or self.grid_points < 1:
            raise ConfigError(f"--grid-points={self.grid_points} must be an integer >= 1")
        if not (self.huber_delta > 0 and math.isfinite(self.huber_delta)):
            raise ConfigError(f"--huber-delta={self.huber_delta} must be > 0")
        return self


@dataclass(frozen=True)
class Points:
    """One variant's points: parameters N, tokens D, loss L, the resampling unit (run) of each."""

    variant: str
    n: np.ndarray
    d: np.ndarray
    loss: np.ndarray
    flops: np.ndarray
    runs: np.ndarray

    def subset(self, mask: np.ndarray) -> "Points":
        return Points(self.variant, self.n[mask], self.d[mask], self.loss[mask], self.flops[mask], self.runs[mask])


@dataclass
class Coefficient:
    value: float
    low: Optional[float] = None
    high: Optional[float] = None

    def to_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high}

    def describe(self) -> str:
        if self.low is None:
            return f"{self.value:.4g}"
        return f"{self.value:.4g} [{self.low:.4g}, {self.high:.4g}]"


def _law_value(law: str, c: dict[str, float], n, d=None) -> np.ndarray:
    """The law with coefficients `c` at (n, d); A/N^alpha has no E."""
    out = c.get("E", 0.0) + c["A"] / np.asarray(n, dtype=float) ** c["alpha"]
    if law == LAW_ND:
        out = out + c["B"] / np.asarray(d, dtype=float) ** c["beta"]
    return out


@dataclass
class LawFit:
    law: str
    coefficients: dict[str, Coefficient]
    points: int
    objective: float
    """The Huber objective at the optimum (divided by delta^2)."""
    bootstrap_fits: int = 0
    rms_log_residual: float = 0.0
    bootstrap_coefficients: Optional[np.ndarray] = None
    """One row per bootstrap fit, the coefficients in `coefficients`' order (for bands)."""
    confidence: float = 0.95

    def band(self, n, d=None) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """The pointwise interval of the bootstrap fits' predictions at (n, d); None without them."""
        if self.bootstrap_coefficients is None or not len(self.bootstrap_coefficients):
            return None
        names = list(self.coefficients)
        curves = [_law_value(self.law, dict(zip(names, row)), n, d) for row in self.bootstrap_coefficients]
        tail = (1 - self.confidence) / 2 * 100
        low, high = np.percentile(np.array(curves), [tail, 100 - tail], axis=0)
        return low, high

    def predict(self, n, d=None) -> np.ndarray:
        return _law_value(self.law, {k: v.value for k, v in self.coefficients.items()}, n, d)

    def to_dict(self) -> dict:
        return {"law": self.law, "points": self.points, "objective": self.objective,
                **({"note": "two sizes: the power law A / N^alpha through them (E = 0), a slope, not a "
                            "scaling law"} if self.law == LAW_POWER else {}),
                "rms_log_residual": self.rms_log_residual, "bootstrap_fits": self.bootstrap_fits,
                "coefficients": {k: v.to_dict() for k, v in self.coefficients.items()}}


@dataclass
class VariantFit:
    variant: str
    law_n: LawFit
    law_nd: Optional[LawFit]
    skipped_nd: Optional[str] = None


@dataclass
class FitReport:
    source: str
    options: FitOptions
    variants: list[VariantFit]
    written: list[Path] = field(default_factory=list)

    def describe(self) -> str:
        level = f"{self.options.confidence:.0%}"
        lines = [f"scaling-law fit of {self.source} (Huber delta {self.options.huber_delta:g} on log-loss, "
                 f"L-BFGS-B from a {self.options.grid_points}-per-coefficient grid; {level} bootstrap intervals "
                 f"over {self.options.bootstrap} resamples of the runs)"]
        for fit in self.variants:
            for law in (fit.law_n, fit.law_nd):
                if law is None:
                    continue
                coefs = ", ".join(f"{k} = {v.describe()}" for k, v in law.coefficients.items())
                lines.append(f"{fit.variant:>12}  {law.law:<7} {coefs}   ({law.points} points, rms log residual "
                             f"{law.rms_log_residual:.2g})")
            if fit.skipped_nd:
                lines.append(f"{fit.variant:>12}  {LAW_ND:<7} not fitted: {fit.skipped_nd}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"source": self.source, "method": "Huber on log-loss, LSE parametrisation, L-BFGS-B from a grid "
                                                 "(Hoffmann et al. 2022 approach 3; Besiroglu et al. 2024)",
                "options": vars(self.options),
                "variants": {f.variant: {LAW_N: f.law_n.to_dict(),
                                         LAW_ND: f.law_nd.to_dict() if f.law_nd else {"skipped": f.skipped_nd}}
                             for f in self.variants}}


# ----------------------------------------------------------------------------- the objective


def _huber(residual: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss / delta^2 and its derivative, elementwise."""
    clipped = np.clip(residual, -delta, delta)
    value = clipped * (residual - 0.5 * clipped) / delta**2  # r^2 / 2 inside [-delta, delta], linear outside
    return value, clipped / delta**2


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: Optional[np.ndarray], log_loss: np.ndarray,
               delta: float) -> tuple[float, np.ndarray]:
    """theta = (a, alpha) for A/N^alpha, (a, alpha, e) for L(N), (a, alpha, b, beta, e) for L(N, D);
    value and gradient.
    (Plain numpy rather than scipy.special's logsumexp / softmax: this runs some 10^5 times
    per fit on a few dozen points, where their per-call overhead dominates.)"""
    if len(theta) == 2:  # log L = a - alpha log N: linear, no log-sum-exp
        value, dres = _huber(theta[0] - theta[1] * log_n - log_loss, delta)
        return float(value.sum()), np.array([dres.sum(), -(dres @ log_n)])
    if log_d is None:
        a, alpha, e = theta
        terms = np.stack([a - alpha * log_n, np.full_like(log_n, e)])
    else:
        a, alpha, b, beta, e = theta
        terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    top = terms.max(axis=0)
    exps = np.exp(terms - top)
    total = exps.sum(axis=0)
    predicted = top + np.log(total)  # log-sum-exp over the terms, per point
    value, dres = _huber(predicted - log_loss, delta)
    weights = exps * (dres / total)  # d objective / d term, per point (softmax x Huber')
    if log_d is None:
        grad = np.array([weights[0].sum(), -(weights[0] @ log_n), weights[1].sum()])
    else:
        grad = np.array([weights[0].sum(), -(weights[0] @ log_n), weights[1].sum(), -(weights[1] @ log_d),
                         weights[2].sum()])
    return float(value.sum()), grad


def start_grid(law: str, points_per_axis: int) -> np.ndarray:
    """Hoffmann et al.'s ranges, `points_per_axis` values each."""
    def axis(low, high):
        return np.linspace(low, high, points_per_axis) if points_per_axis > 1 else np.array([(low + high) / 2])

    a, exponent, e = axis(0, 25), axis(0, 2), axis(-1, 1)
    if law == LAW_POWER:
        return np.array(list(itertools.product(a, exponent)))
    if law == LAW_N:
        return np.array(list(itertools.product(a, exponent, e)))
    return np.array(list(itertools.product(a, exponent, a, exponent, e)))


def _minimise(starts: np.ndarray, log_n, log_d, log_loss, delta) -> list[tuple[float, np.ndarray]]:
    """Every start's end point, best first."""
    ends = []
    with np.errstate(over="ignore", invalid="ignore"):
        for start in starts:
            result = minimize(_objective, start, args=(log_n, log_d, log_loss, delta), jac=True, method="L-BFGS-B",
                              options={"maxiter": 1000, "ftol": 1e-15, "gtol": 1e-10})
            if np.isfinite(result.fun) and np.all(np.isfinite(result.x)):
                ends.append((float(result.fun), result.x))
    ends.sort(key=lambda end: end[0])
    return ends


def _distinct(ends: list[tuple[float, np.ndarray]], count: int) -> np.ndarray:
    """The best `count` end points that are not the same optimum reached from two starts."""
    chosen: list[np.ndarray] = []
    for _, theta in ends:
        if all(np.abs(theta - other).max() > 1e-3 for other in chosen):
            chosen.append(theta)
        if len(chosen) == count:
            break
    return np.array(chosen)


def _coefficients(law: str, theta: np.ndarray) -> dict[str, float]:
    if law == LAW_POWER:
        a, alpha = theta
        return {"A": math.exp(a), "alpha": float(alpha)}
    if law == LAW_N:
        a, alpha, e = theta
        return {"E": math.exp(e), "A": math.exp(a), "alpha": float(alpha)}
    a, alpha, b, beta, e = theta
    return {"E": math.exp(e), "A": math.exp(a), "alpha": float(alpha), "B": math.exp(b), "beta": float(beta)}


def _identifiable(law: str, n: np.ndarray, d: np.ndarray) -> bool:
    """Enough distinct points for the law's coefficients: 3 sizes for L(N); for L(N, D) 2 sizes,
    2 budgets and 5 distinct (N, D) points; 2 sizes for A/N^alpha."""
    if law == LAW_POWER:
        return len(np.unique(n)) >= 2
    if law == LAW_N:
        return len(np.unique(n)) >= 3
    return len(np.unique(n)) >= 2 and len(np.unique(d)) >= 2 and len(set(zip(n, d))) >= 5


def fit_law(points: Points, law: str, options: FitOptions) -> LawFit:
    log_n, log_loss = np.log(points.n), np.log(points.loss)
    log_d = np.log(points.d) if law == LAW_ND else None
    ends = _minimise(start_grid(law, options.grid_points), log_n, log_d, log_loss, options.huber_delta)
    if not ends:
        raise ConfigError(f"variant {points.variant}: the {law} fit found no finite optimum")
    objective, best = ends[0]
    values = _coefficients(law, best)
    fit = LawFit(law, {k: Coefficient(v) for k, v in values.items()}, len(points.loss), objective)
    fit.rms_log_residual = float(np.sqrt(np.mean((np.log(fit.predict(points.n, points.d)) - log_loss) ** 2)))

    if options.bootstrap:
        starts = _distinct(ends, options.restarts)
        rng = np.random.default_rng(options.seed)
        units = np.unique(points.runs)
        samples = []
        for _ in range(options.bootstrap):
            chosen = rng.choice(units, size=len(units), replace=True)
            index = np.concatenate([np.flatnonzero(points.runs == unit) for unit in chosen])
            if not _identifiable(law, points.n[index], points.d[index]):
                continue  # e.g. every draw the same size: the law's coefficients are not determined
            refit = _minimise(starts, log_n[index], None if log_d is None else log_d[index], log_loss[index],
                              options.huber_delta)
            if refit:
                samples.append(list(_coefficients(law, refit[0][1]).values()))
        if samples:
            tail = (1 - options.confidence) / 2 * 100
            low, high = np.percentile(np.array(samples), [tail, 100 - tail], axis=0)
            for (name, coef), lo, hi in zip(fit.coefficients.items(), low, high):
                coef.low, coef.high = float(lo), float(hi)
            fit.bootstrap_fits = len(samples)
            fit.bootstrap_coefficients = np.array(samples)
            fit.confidence = options.confidence
    return fit


# ----------------------------------------------------------------------------- input


def read_points(csv_path: Path, all_points: bool = False) -> list[Points]:
    """One Points per variant from a CSV with at least variant, parameters, tokens, loss; with a
    `final` column only the final rows unless `all_points` (rows at tokens = 0 are always left out)."""
    try:
        with csv_path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ConfigError(f"{csv_path}: cannot read it as a CSV ({err})") from None
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise ConfigError(f"{csv_path}: missing column(s) {', '.join(missing)}; a fit needs the columns "
                          f"{', '.join(REQUIRED)} (flops, final and run_id are optional)")
    records = []
    for line, row in enumerate(rows, start=2):
        if "final" in columns and not all_points and str(row["final"]).strip().lower() not in ("true", "1", "yes"):
            continue
        try:
            n, d, loss = float(row["parameters"]), float(row["tokens"]), float(row["loss"])
            flops = float(row["flops"]) if row.get("flops") not in (None, "") else 6 * n * d
        except ValueError:
            raise ConfigError(f"{csv_path}: line {line}: parameters, tokens, loss (and flops) must be numbers") from None
        if not all(math.isfinite(x) for x in (n, d, loss, flops)) or n <= 0 or loss <= 0:
            raise ConfigError(f"{csv_path}: line {line}: parameters and loss must be finite and > 0")
        if d <= 0:
            continue
        records.append((row["variant"], n, d, loss, flops, row.get("run_id") or f"line{line}"))
    if not records:
        raise ConfigError(f"{csv_path}: no points to fit (no rows{' marked final' if 'final' in columns else ''} "
                          "with tokens > 0); collect a sweep with finished runs, or pass --all-points")
    out = []
    for variant in sorted({r[0] for r in records}):
        chosen = [r for r in records if r[0] == variant]
        columns_of = list(zip(*chosen))
        out.append(Points(variant, *(np.array(c, dtype=float) for c in columns_of[1:5]), np.array(columns_of[5])))
    return out


def _largest_budget_per_size(points: Points) -> Points:
    keep = np.zeros(len(points.n), dtype=bool)
    for n in np.unique(points.n):
        same = points.n == n
        keep |= same & (points.d == points.d[same].max())
    return points.subset(keep)


def _one_blas_thread():
    """numpy's BLAS with one thread while fitting: the fit's vectors are a few dozen numbers, and
    idle BLAS threads spinning between L-BFGS iterations made it some 25x slower (measured).
    threadpoolctl is a declared dependency; without it the fit is only slower."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def fit_points(all_points: list[Points], options: FitOptions) -> list[VariantFit]:
    with _one_blas_thread():
        return [_fit_variant(points, options) for points in all_points]


def _fit_variant(points: Points, options: FitOptions) -> VariantFit:
    largest = _largest_budget_per_size(points)
    sizes = len(np.unique(largest.n))
    if sizes < 2:
        raise ConfigError(f"variant {points.variant}: {sizes} model size; a loss-vs-parameters fit needs at "
                          "least 2 sizes (A/N^alpha), L(N) = E + A/N^alpha at least 3")
    law_n = fit_law(largest, LAW_N if sizes >= 3 else LAW_POWER, options)
    budgets = [len(np.unique(points.d[points.n == n])) for n in np.unique(points.n)]
    law_nd, skipped = None, None
    if min(budgets) < 2:
        skipped = "a size has a single token budget (L(N, D) needs at least two per size)"
    elif len(points.loss) < 6:
        skipped = f"{len(points.loss)} points for 5 coefficients (needs at least 6)"
    else:
        law_nd = fit_law(points, LAW_ND, options)
    return VariantFit(points.variant, law_n, law_nd, skipped)


def fit_source(source: str | Path, out_dir: Optional[str | Path] = None, options: FitOptions = FitOptions(),
               root: Optional[str] = None) -> FitReport:
    """Fits a results CSV, or a sweep file (collected first, its results.csv written to its root)."""
    options.validate()
    source = Path(source)
    if not source.is_file():
        raise ConfigError(f"{source}: no such file; give a results.csv or a sweep file")
    if source.suffix in (".yaml", ".yml"):
        from sweep.collect import collect, write_collection
        from sweep.spec import load_sweep

        sweep = load_sweep(source, root=root)
        csv_path, _ = write_collection(collect(sweep), sweep.root)
    else:
        csv_path = source
    points = read_points(csv_path, all_points=options.all_points)
    report = FitReport(str(csv_path), options, fit_points(points, options))
    out = Path(out_dir) if out_dir else csv_path.parent
    out.mkdir(parents=True, exist_ok=True)
    fit_json = out / "fit.json"
    fit_json.write_text(json.dumps(report.to_dict(), indent=1))
    from sweep.plots import plot_fits

    report.written = [fit_json, *plot_fits(points, report.variants, out)]
    return report
