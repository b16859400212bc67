#!/usr/bin/env python
"""lmm_symbolic against lme4 and statsmodels, side by side in one run.

    python benchmarks/benchmark.py                 # n = 1e4, 1e5, 1e6 (G = n / 100)
    python benchmarks/benchmark.py --full          # and n = 1e7
    python benchmarks/benchmark.py --sizes 1e5,1e6 --no-statsmodels

For each size it simulates y = 1 + 0.5 x1 - 0.3 x2 + u_g + e (u ~ N(0, 1), e ~ N(0, 1)) and fits
``y ~ x1 + x2 + (1|g)`` by maximum likelihood (so log-likelihoods are comparable) with

* lmm_symbolic: ``lmm_symbolic.fit(formula, DataFrame, method="ML")`` end to end (formula processing,
  per-group statistics, optimisation, results), the data already in memory, after one warm-up fit on small
  data (the lambdified kernels are compiled once per session, as R's packages are loaded once);
* lme4: ``lmer(..., REML = FALSE)`` inside ``Rscript``, timed with ``system.time`` around the lmer call
  alone (its formula processing included; the grouping column is numeric, so lmer makes the factor), the
  time R takes to read the CSV reported separately;
* statsmodels: ``smf.mixedlm("y ~ x1 + x2", df, groups=df["g"]).fit(reml=False)`` (skipped above
  --statsmodels-max rows, 10^6 by default: it takes minutes there).

Every tool runs in its own process. Times are the best of --reps runs (the machine may be shared), wall
clock. Peak memory is what the fit allocates above the data already in memory: tracemalloc's peak for
lmm_symbolic, R's ``gc()`` "max used" for lme4, the sampled resident set for statsmodels.

Then: derivation time (``lmm_symbolic.derive`` and all of Eq. 1-12) against n, next to sympy's dense
``Matrix.det()`` of the n x n Sigma (stopped after --dense-timeout seconds), and per-fit times on
lme4's example models (random slopes, nested and crossed terms), a simulated crossed design with 10^5
rows and a simulated random-slope design with 10^6 rows against lme4. The tables are printed and written
to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FORMULA = "y ~ x1 + x2 + (1|g)"
log = logging.getLogger("lmm_symbolic.benchmark")


# ------------------------------------------------------------------------------------------ data
def simulate(n: int, seed: int = 1) -> dict[str, np.ndarray]:
    G = max(2, n // 100)
    rng = np.random.default_rng(seed)
    g = rng.integers(0, G, n)
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    y = 1.0 + 0.5 * x1 - 0.3 * x2 + rng.normal(size=G)[g] + rng.normal(size=n)
    return {"y": y, "x1": x1, "x2": x2, "g": g}


def write_data(cols: dict[str, np.ndarray], folder: Path, csv: bool) -> None:
    for name, values in cols.items():
        np.save(folder / f"{name}.npy", values)
    if csv:
        import pandas as pd

        # repr floats (pandas' default) read back exactly, so both sides fit the same numbers
        pd.DataFrame(cols).to_csv(folder / "data.csv", index=False)


def read_frame(folder: Path):
    import pandas as pd

    return pd.DataFrame({name: np.load(folder / f"{name}.npy") for name in ("y", "x1", "x2", "g")})


# -------------------------------------------------------------------------------------- workers
class RssSampler:
    """Highest resident set size seen while running (sampled every 2 ms), in MB above the start."""

    def __init__(self):
        import threading

        import psutil

        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def mb(self) -> float:
        return (self.peak - self.base) / 1e6


def worker_lmm(folder: Path, reps: int) -> dict:
    import tracemalloc
    import warnings

    import lmm_symbolic as lmm
    from lmm_symbolic.compilation import InterceptDeviance
    from lmm_symbolic.optimisation import optimise
    from lmm_symbolic.results import make_result
    from lmm_symbolic.statistics import GroupStatistics

    warnings.simplefilter("ignore", lmm.LMMWarning)
    df = read_frame(folder)
    small = df.iloc[: min(len(df), 2000)]
    lmm.fit(FORMULA, small, method="ML")   # warm-up: imports, lambdified kernels
    times, stages = [], {"specify": [], "statistics": [], "optimise": [], "results": []}
    fit = None
    for _ in range(reps):
        t0 = time.perf_counter()
        fit = lmm.fit(FORMULA, df, method="ML")
        times.append(time.perf_counter() - t0)
    for _ in range(reps):
        t0 = time.perf_counter()
        design = lmm.specify(FORMULA, df)
        t1 = time.perf_counter()
        stats = GroupStatistics.of(design)
        t2 = time.perf_counter()
        opt = optimise(InterceptDeviance(design, reml=False, stats=stats))
        t3 = time.perf_counter()
        make_result(design, opt)
        t4 = time.perf_counter()
        for key, a, b in zip(stages, (t0, t1, t2, t3), (t1, t2, t3, t4)):
            stages[key].append(b - a)
        del design, stats, opt
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    lmm.fit(FORMULA, df, method="ML")
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return {"times": times, "stages": {k: min(v) for k, v in stages.items()}, "loglik": fit.loglik,
            "params": fit.params.tolist(), "sigma": fit.sigma, "sigma_s": fit.sigma_s, "peak_mb": peak / 1e6,
            "data_mb": float(df.memory_usage(index=False).sum() / 1e6), "converged": fit.converged,
            "evaluations": fit.opt.evaluations}


def worker_statsmodels(folder: Path, reps: int) -> dict:
    import warnings

    import statsmodels.formula.api as smf

    warnings.simplefilter("ignore")
    df = read_frame(folder)
    times, peak, res = [], 0.0, None
    for _ in range(reps):
        try:
            sampler = RssSampler()
        except ImportError:
            sampler = None
        t0 = time.perf_counter()
        if sampler is not None:
            with sampler:
                res = smf.mixedlm("y ~ x1 + x2", df, groups=df["g"]).fit(reml=False)
            peak = max(peak, sampler.mb)
        else:
            res = smf.mixedlm("y ~ x1 + x2", df, groups=df["g"]).fit(reml=False)
        times.append(time.perf_counter() - t0)
    return {"times": times, "loglik": float(res.llf), "params": [float(v) for v in res.fe_params],
            "peak_mb": peak if peak else math.nan}


R_FIT = r"""
suppressMessages(library(lme4))
args <- commandArgs(TRUE)
path <- args[1]; reps <- as.integer(args[2])
invisible(gc(reset = TRUE))
read <- system.time(d <- if (requireNamespace("data.table", quietly = TRUE))
  data.table::fread(path, data.table = FALSE) else read.csv(path))[["elapsed"]]
g0 <- gc(reset = TRUE)
used <- sum(g0[, 2])
times <- c(); cpu <- c()
for (i in seq_len(reps)) {
  st <- system.time(m <- lmer(y ~ x1 + x2 + (1|g), data = d, REML = FALSE))
  times <- c(times, st[["elapsed"]]); cpu <- c(cpu, st[["user.self"]] + st[["sys.self"]])
}
g1 <- gc()
cat(jsonlite::toJSON(list(read = read, times = times, cpu = cpu, loglik = as.numeric(logLik(m)),
  params = unname(fixef(m)), sigma = sigma(m), sigma_s = as.data.frame(VarCorr(m))$sdcor[1],
  peak_mb = sum(g1[, 6]) - used, lme4 = as.character(packageVersion("lme4")),
  R = paste(R.version$major, R.version$minor, sep = ".")), digits = NA, auto_unbox = TRUE), "\n")
"""

R_MODELS = r"""
suppressMessages(library(lme4))
args <- commandArgs(TRUE)
N <- as.integer(args[1])
data <- list(sleepstudy = sleepstudy, Pastes = Pastes, Penicillin = Penicillin, crossed = read.csv(args[2]),
             slopes = read.csv(args[4]))
models <- jsonlite::fromJSON(args[3], simplifyVector = FALSE)
one <- function(m) {
  f <- as.formula(m$formula); d <- data[[m$data]]; n <- if (m$data %in% c("crossed", "slopes")) 1 else N
  fit <- lmer(f, d)
  t <- system.time(for (i in seq_len(n)) fit <- lmer(f, d))[["elapsed"]] / n
  list(time = t, loglik = as.numeric(logLik(fit)))
}
cat(jsonlite::toJSON(lapply(models, one), digits = NA, auto_unbox = TRUE), "\n")
"""


def r_available() -> bool:
    if shutil.which("Rscript") is None:
        return False
    probe = subprocess.run(["Rscript", "-e", "library(lme4); library(jsonlite)"], capture_output=True)
    return probe.returncode == 0


def run_r(script: str, args: list[str], timeout: float) -> dict | str:
    with tempfile.NamedTemporaryFile("w", suffix=".R", delete=False) as fh:
        fh.write(script)
    try:
        out = subprocess.run(["Rscript", fh.name, *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"stopped after {timeout:.0f} s"
    finally:
        os.unlink(fh.name)
    if out.returncode != 0:
        return "failed: " + (out.stderr.strip().splitlines() or ["?"])[-1]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("times", "cpu"):  # jsonlite writes a vector of one as a number
        if key in result and not isinstance(result[key], list):
            result[key] = [result[key]]
    return result


def run_worker(kind: str, folder: Path, reps: int, timeout: float) -> dict | str:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--data", str(folder),
           "--reps", str(reps)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"stopped after {timeout:.0f} s"
    if out.returncode != 0:
        return "failed: " + (out.stderr.strip().splitlines() or ["?"])[-1]
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------- derivation
def _paired(n: int):
    """The tutorial's toy design grown to n rows: two individuals, each measured n/2 times under
    alternating treatments (Sigma has two dense n/2 x n/2 blocks)."""
    import pandas as pd

    rng = np.random.default_rng(n)
    return pd.DataFrame({"Resp": np.round(rng.normal(10, 2, n), 2), "Treat": np.arange(n) % 2,
                         "Ind": np.repeat([1, 2], [n - n // 2, n // 2])})


def dense_det_worker(n: int) -> dict:
    """sympy's dense determinant of the n x n Sigma = sigma^2 I + sigma_s^2 K K^T, and whether it equals
    the closed form lmm_symbolic derives."""
    import sympy as sp

    import lmm_symbolic as lmm
    from lmm_symbolic.derivation import sigma, sigma_s

    d = lmm.derive("Resp ~ Treat + (1|Ind)", _paired(n))
    codes = np.asarray(d.design.terms[0].codes)
    S = sp.Matrix(n, n, lambda i, j: sigma_s**2 * int(codes[i] == codes[j]) + (sigma**2 if i == j else 0))
    t0 = time.perf_counter()
    dense = S.det()
    elapsed = time.perf_counter() - t0
    return {"time": elapsed, "agrees": bool(sp.expand(dense - d.det) == 0)}


def derivation_rows(sizes: list[int], dense_max: int, dense_timeout: float) -> list[dict]:
    import lmm_symbolic as lmm

    lmm.derive("Resp ~ Treat + (1|Ind)", _paired(10)).equations  # warm-up (block identities are cached)
    rows = []
    for n in sizes:
        data = _paired(n)
        t0 = time.perf_counter()
        d = lmm.derive("Resp ~ Treat + (1|Ind)", data)
        eqs = d.equations
        closed = time.perf_counter() - t0
        row = {"n": n, "closed": closed, "equations": len(eqs), "dense": None}
        if n <= dense_max:
            log.info("dense sympy determinant, n = %d (stopped after %.0f s)", n, dense_timeout)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "dense", "--n", str(n)]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=dense_timeout)
                row["dense"] = (json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0
                                else "failed")
            except subprocess.TimeoutExpired:
                row["dense"] = f"> {dense_timeout:.0f} s (stopped)"
        rows.append(row)
    return rows


# ------------------------------------------------------------------------- lme4's example models
MODELS = [
    ("sleepstudy", "Reaction ~ Days + (1|Subject)"),
    ("sleepstudy", "Reaction ~ Days + (Days|Subject)"),
    ("sleepstudy", "Reaction ~ Days + (1|Subject) + (0 + Days|Subject)"),
    ("Pastes", "strength ~ 1 + (1|batch/cask)"),
    ("Penicillin", "diameter ~ 1 + (1|plate) + (1|sample)"),
    ("crossed", "y ~ x + (1|a) + (1|b)"),
    ("slopes", "y ~ x + (x|g)"),
]
#: the simulated crossed design: rows, levels of a and of b
CROSSED = (100_000, 2000, 50)
#: the simulated random-slope design: rows, groups
SLOPES = (1_000_000, 10_000)


def simulate_crossed(seed: int = 1):
    import pandas as pd

    n, Ga, Gb = CROSSED
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, Ga, n), rng.integers(0, Gb, n)
    x = rng.normal(size=n)
    y = 1 + 0.5 * x + rng.normal(size=Ga)[a] + 0.7 * rng.normal(size=Gb)[b] + rng.normal(size=n)
    return pd.DataFrame({"y": y, "x": x, "a": a, "b": b})


def simulate_slopes(seed: int = 1):
    """y = 1 + 0.5 x + u_g + v_g x + e, (u, v) ~ N(0, [[1, 0.3], [0.3, 0.5]])."""
    import pandas as pd

    n, G = SLOPES
    rng = np.random.default_rng(seed)
    g, x = rng.integers(0, G, n), rng.normal(size=n)
    uv = rng.multivariate_normal([0.0, 0.0], [[1.0, 0.3], [0.3, 0.5]], size=G)
    y = 1 + 0.5 * x + uv[g, 0] + uv[g, 1] * x + rng.normal(size=n)
    return pd.DataFrame({"y": y, "x": x, "g": g})


def model_rows(reps: int, with_r: bool, seed: int) -> list[dict]:
    """Each model fitted by REML (lme4's default) with the median of ``reps`` fits (3 for the simulated
    designs; lme4 once, after a first fit), lme4 in one Rscript run over the same data."""
    import warnings

    import lmm_symbolic as lmm

    warnings.simplefilter("ignore", lmm.LMMWarning)
    simulated = {"crossed": simulate_crossed(seed), "slopes": simulate_slopes(seed)}
    labels = {"crossed": "simulated, n = {:,}, {} x {} levels".format(*CROSSED),
              "slopes": "simulated, n = {:,}, {:,} groups".format(*SLOPES)}
    with tempfile.TemporaryDirectory(prefix="lmm_models_") as tmp:
        paths = {k: Path(tmp) / f"{k}.csv" for k in simulated}
        for k, frame in simulated.items():
            frame.to_csv(paths[k], index=False)
        spec = json.dumps([{"data": d, "formula": f} for d, f in MODELS])
        r = (run_r(R_MODELS, [str(reps), str(paths["crossed"]), spec, str(paths["slopes"])], timeout=1800)
             if with_r else "no R")
    rows = []
    for k, (name, formula) in enumerate(MODELS):
        data = simulated[name] if name in simulated else lmm.datasets.load(name)
        log.info("%s: %s", name, formula)
        row = {"data": labels.get(name, name),
               "formula": formula}
        fit = lmm.fit(formula, data, exact=False)
        times = []
        for _ in range(3 if name in simulated else reps):
            t0 = time.perf_counter()
            fit = lmm.fit(formula, data, exact=False)
            times.append(time.perf_counter() - t0)
        row.update(lmm=float(np.median(times)), loglik=fit.loglik, evaluations=fit.opt.evaluations)
        if isinstance(r, list):
            row.update(lme4=r[k]["time"], lme4_loglik=r[k]["loglik"])
        else:
            row["lme4"] = r
        rows.append(row)
    return rows


# -------------------------------------------------------------------------------------- tables
def _fmt_time(v) -> str:
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "--"
    return f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.2f} s"


def _fmt(v, spec: str) -> str:
    if v is None or isinstance(v, str) or (isinstance(v, float) and math.isnan(v)):
        return "--" if not isinstance(v, str) else v
    return format(v, spec)


def _pow10(n: int) -> str:
    k = math.log10(n)
    return f"10^{int(k)}" if k == int(k) else str(n)


def main_table(results: list[dict]) -> str:
    head = ("| n | G | lmm_symbolic | lme4 lmer | lme4 / lmm | statsmodels | statsmodels / lmm | "
            "logLik lmm - lme4 | logLik sm - lme4 | peak MB lmm | peak MB lme4 | peak MB sm | R read CSV |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        lm, lme, sm = r["lmm"], r["lme4"], r["statsmodels"]
        t_l = min(lm["times"]) if isinstance(lm, dict) else lm
        t_r = min(lme["times"]) if isinstance(lme, dict) else lme
        t_s = min(sm["times"]) if isinstance(sm, dict) else sm
        ratio = t_r / t_l if isinstance(t_r, float) and isinstance(t_l, float) else None
        ratio_s = t_s / t_l if isinstance(t_s, float) and isinstance(t_l, float) else None
        d_l = lm["loglik"] - lme["loglik"] if isinstance(lm, dict) and isinstance(lme, dict) else None
        d_s = sm["loglik"] - lme["loglik"] if isinstance(sm, dict) and isinstance(lme, dict) else None
        lines.append("| " + " | ".join([
            _pow10(r["n"]), str(r["G"]),
            _fmt_time(t_l) + (f" (median {_fmt_time(float(np.median(lm['times'])))})" if isinstance(lm, dict)
                              else ""),
            _fmt_time(t_r),
            f"**{ratio:.0f}x**" if ratio else "--", _fmt_time(t_s), f"{ratio_s:.0f}x" if ratio_s else "--",
            _fmt(d_l, ".2e"), _fmt(d_s, ".2e"),
            _fmt(lm.get("peak_mb") if isinstance(lm, dict) else None, ".0f"),
            _fmt(lme.get("peak_mb") if isinstance(lme, dict) else None, ".0f"),
            _fmt(sm.get("peak_mb") if isinstance(sm, dict) else None, ".0f"),
            _fmt_time(lme["read"]) if isinstance(lme, dict) else "--"]) + " |")
    return "\n".join(lines)


def stage_table(results: list[dict]) -> str:
    lines = ["| n | data MB | specify | group statistics | optimise | results | whole fit | optimiser evaluations |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lm = r["lmm"]
        if not isinstance(lm, dict):
            continue
        s = lm["stages"]
        lines.append(f"| {_pow10(r['n'])} | {lm['data_mb']:.0f} | {_fmt_time(s['specify'])} | "
                     f"{_fmt_time(s['statistics'])} | {_fmt_time(s['optimise'])} | {_fmt_time(s['results'])} | "
                     f"{_fmt_time(min(lm['times']))} | {lm['evaluations']} |")
    return "\n".join(lines)


def derivation_table(rows: list[dict]) -> str:
    lines = ["| n | lmm_symbolic.derive + Eq. 1-12 | sympy dense Matrix.det() of Sigma | dense = closed form |",
             "|---|---|---|---|"]
    for r in rows:
        dense = r["dense"]
        if dense is None:
            cell, agree = "--", "--"
        elif isinstance(dense, str):
            cell, agree = dense, "--"
        else:
            cell, agree = _fmt_time(dense["time"]), "yes" if dense["agrees"] else "NO"
        lines.append(f"| {r['n']} | {_fmt_time(r['closed'])} | {cell} | {agree} |")
    return "\n".join(lines)


def model_table(rows: list[dict]) -> str:
    lines = ["| data | model (REML) | lmm_symbolic per fit | evaluations | lme4 per fit | lme4 / lmm | "
             "logLik lmm - lme4 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lm, lme = r.get("lmm"), r.get("lme4")
        ratio = f"{lme / lm:.2f}x" if isinstance(lm, float) and isinstance(lme, float) else "--"
        diff = (r["loglik"] - r["lme4_loglik"]) if "lme4_loglik" in r else None
        formula = r["formula"].replace("|", "\\|")        # a bare | would split the Markdown cell
        lines.append(f"| {r['data']} | `{formula}` | {_fmt_time(lm)} | {r.get('evaluations', '--')} | "
                     f"{_fmt_time(lme) if isinstance(lme, float) else lme} | {ratio} | {_fmt(diff, '.2e')} |")
    return "\n".join(lines)


def machine() -> str:
    import formulaic
    import pandas
    import scipy
    import sympy

    try:
        import psutil

        mem = f"{psutil.virtual_memory().total / 2**30:.0f} GiB"
    except ImportError:
        mem = "?"
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {mem} RAM, load average "
            f"{load}; Python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}, "
            f"pandas {pandas.__version__}, formulaic {formulaic.__version__}, sympy {sympy.__version__}")


# ----------------------------------------------------------------------------------------- main
def parse_sizes(text: str) -> list[int]:
    return [int(float(v)) for v in text.split(",") if v.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=parse_sizes, default=None, help="comma-separated n, e.g. 1e4,1e6")
    p.add_argument("--full", action="store_true", help="add n = 10^7 to the default sizes")
    p.add_argument("--reps", type=int, default=3, help="runs per fit (best is reported; 1-2 for n >= 10^6)")
    p.add_argument("--no-r", action="store_true", help="skip lme4")
    p.add_argument("--no-statsmodels", action="store_true")
    p.add_argument("--statsmodels-max", type=float, default=1e6)
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per tool and size")
    p.add_argument("--derive-sizes", type=parse_sizes, default=parse_sizes("10,20,40,80,1000,10000,100000"))
    p.add_argument("--dense-max", type=int, default=80)
    p.add_argument("--dense-timeout", type=float, default=60)
    p.add_argument("--model-reps", type=int, default=50, help="fits per model of lme4's examples")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: fits, derive, models")
    p.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--seed", type=int, default=1)
    # internal: one tool in a fresh process
    p.add_argument("--worker", choices=["lmm", "statsmodels", "dense"], help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        work = {"lmm": lambda: worker_lmm(args.data, args.reps),
                "statsmodels": lambda: worker_statsmodels(args.data, args.reps),
                "dense": lambda: dense_det_worker(args.n)}[args.worker]
        print(json.dumps(work()))
        return 0

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    logging.getLogger("lmm_symbolic").setLevel(logging.WARNING)  # the package's per-fit lines: off here
    log.setLevel(logging.INFO)
    sizes = args.sizes or ([10**4, 10**5, 10**6] + ([10**7] if args.full else []))
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    with_r = not args.no_r and r_available()
    if not with_r and not args.no_r:
        log.info("Rscript with lme4 and jsonlite not found: lme4 is skipped")
    started = datetime.datetime.now()
    before = machine()
    results = []
    if "fits" not in skip:
        for n in sizes:
            reps = args.reps if n < 10**6 else max(1, min(args.reps, 2 if n == 10**6 else 1))
            with tempfile.TemporaryDirectory(prefix="lmm_bench_") as tmp:
                folder = Path(tmp)
                log.info("n = %d: simulating and writing the data", n)
                write_data(simulate(n, args.seed), folder, csv=with_r)
                row = {"n": n, "G": max(2, n // 100)}
                lmm_reps = max(args.reps, 5 if n <= 10**6 else 3)  # cheap: more runs, a steadier best
                log.info("n = %d: lmm_symbolic (%d runs)", n, lmm_reps)
                row["lmm"] = run_worker("lmm", folder, lmm_reps, args.timeout)
                if with_r:
                    log.info("n = %d: lme4 lmer (%d runs)", n, reps)
                    row["lme4"] = run_r(R_FIT, [str(folder / "data.csv"), str(reps)], args.timeout)
                else:
                    row["lme4"] = "no R"
                if args.no_statsmodels:
                    row["statsmodels"] = "skipped"
                elif n > args.statsmodels_max:
                    row["statsmodels"] = f"skipped (n > {args.statsmodels_max:.0e})"
                else:
                    log.info("n = %d: statsmodels MixedLM (%d runs)", n, reps if n < 10**6 else 1)
                    row["statsmodels"] = run_worker("statsmodels", folder, reps if n < 10**6 else 1,
                                                    args.timeout)
                for tool in ("lmm", "lme4", "statsmodels"):
                    if isinstance(row[tool], dict):
                        log.info("n = %d: %s best %.3f s, logLik %.6f", n, tool, min(row[tool]["times"]),
                                 row[tool]["loglik"])
                    else:
                        log.info("n = %d: %s: %s", n, tool, row[tool])
                results.append(row)
                args.output.with_suffix(".json").write_text(json.dumps(results, indent=1))
    deriv = [] if "derive" in skip else derivation_rows(args.derive_sizes, args.dense_max, args.dense_timeout)
    models = [] if "models" in skip else model_rows(args.model_reps, with_r, args.seed)

    r_version = next((r["lme4"] for r in results if isinstance(r["lme4"], dict)), None)
    parts = ["# Benchmark results\n",
             f"`python benchmarks/benchmark.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
             f" on {started:%Y-%m-%d %H:%M}, finished {datetime.datetime.now():%H:%M}.\n",
             f"Machine: {before}.",
             (f"R {r_version['R']}, lme4 {r_version['lme4']}." if r_version else ""), ""]
    if results:
        parts += ["## `y ~ x1 + x2 + (1|g)`, ML, G = n/100, data in memory\n",
                  "Best of several runs (lmm_symbolic: 5 up to 10^6 rows, with the median; lme4: 3, 2 at "
                  "10^6, 1 at 10^7), wall clock; lme4's time is the `lmer` call alone (formula processing "
                  "included), R's CSV read separately. logLik differences are lmm_symbolic's (or "
                  "statsmodels') maximum minus lme4's: positive means a higher likelihood. Peak MB: what the "
                  "fit allocates above the data (tracemalloc for lmm_symbolic, R's gc() max used for lme4, "
                  "sampled RSS for statsmodels).\n", main_table(results), "",
                  "lmm_symbolic by stage (best of runs):\n", stage_table(results), ""]
    if deriv:
        parts += ["## Derivation: closed forms against dense sympy\n",
                  "`lmm_symbolic.derive(\"Resp ~ Treat + (1|Ind)\", data)` and all of Eq. 1-12 for the "
                  "tutorial's toy design grown to n rows (two individuals measured n/2 times each under "
                  "alternating treatments), next to sympy's `Matrix.det()` of the dense n x n "
                  "Sigma = sigma^2 I + sigma_s^2 K K^T (checked equal to the closed form).\n",
                  derivation_table(deriv), ""]
    if models:
        parts += ["## Slopes, nested and crossed terms, per fit (REML, median)\n",
                  "lme4's example data sets and two simulated designs; lmm_symbolic's evaluations are "
                  "the optimiser's (deviance and gradient each).\n", model_table(models), ""]
    text = "\n".join(parts)
    print(text)
    args.output.write_text(text + "\n")
    log.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
