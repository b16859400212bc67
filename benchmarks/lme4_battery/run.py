"""Fit the lme4 battery with lmm_symbolic and compare with lme4 (lme4_battery.json, written by battery.R).

Usage: python benchmarks/lme4_battery/run.py [--filter REGEX] [--reps N] [--timeout S]
Writes results.json and results.md next to this script. Each fit runs in a child process with a timeout,
so a hang is recorded, not blocking. logLik difference is ours - lme4's (positive: we found a higher optimum).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import re
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).parent


def load(name: str) -> pd.DataFrame:
    """The CSV with R's classes: factors and ordered factors as Categoricals in R's level order."""
    meta = json.loads((HERE / "data" / f"{name}.json").read_text())
    d = pd.read_csv(HERE / "data" / f"{name}.csv", keep_default_na=False, na_values=[""], dtype=str)
    for c in meta["columns"]:
        n, cls = c["name"], c["class"]
        if cls in ("factor", "ordered"):
            d[n] = pd.Categorical(d[n].where(d[n] != "", None), categories=c["levels"], ordered=cls == "ordered")
        elif cls in ("numeric", "integer"):
            d[n] = pd.to_numeric(d[n].replace("NA", ""), errors="coerce")
    return d


def _fit(case: dict, reps: int, q) -> None:
    try:
        import lmm_symbolic as lmm
        data = load(case["dataset"])
        kw = {"method": case["method"]}
        if case.get("weights"):
            kw["weights"] = data[case["weights"]].to_numpy(float)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            times = []
            for _ in range(reps + 1):
                t0 = time.perf_counter()
                f = lmm.fit(case["formula"], data, **kw)
                times.append(time.perf_counter() - t0)
        vc = f.variance_components
        q.put({"status": "ok", "params": f.params.to_dict(), "bse": f.bse.to_dict(),
               "df": {k: float(v) for k, v in f.df_satterthwaite.items()},
               "sds": [float(s) for s in vc["sd"]], "corr": [float(c) for c in f.correlations["corr"]],
               "loglik": float(f.loglik), "n_obs": int(f.n_obs),
               "time": statistics.median(times[1:]) if reps else times[0],
               "warnings": sorted({str(w.message)[:200] for w in caught})})
    except Exception as e:  # noqa: BLE001 -- recorded, classified below
        import lmm_symbolic as lmm
        kind = "refused" if isinstance(e, lmm.LMMError) else "error"
        q.put({"status": kind, "message": f"{type(e).__name__}: {str(e)[:300]}"})


def run_case(case: dict, reps: int, timeout: float) -> dict:
    q = mp.get_context("fork").Queue()
    p = mp.get_context("fork").Process(target=_fit, args=(case, reps, q))
    t0 = time.perf_counter()
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
        return {"status": "timeout", "message": f"no answer within {timeout:.0f} s"}
    try:
        return q.get(timeout=5)
    except Exception:  # noqa: BLE001
        return {"status": "error", "message": f"child died (exit {p.exitcode}) after {time.perf_counter() - t0:.1f} s"}


def _rel(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-8)))


def compare(ref: dict, ours: dict) -> dict:
    """Largest relative differences; status mismatch when logLik is lower or a parameter differs > 1e-4."""
    out = dict(ours)
    if ours["status"] != "ok":
        return out
    names = list(ref["fixed"])
    ours_names = list(ours["params"])
    if len(ours_names) != len(names):
        out["status"] = "mismatch"
        out["message"] = f"{len(ours_names)} coefficients, lme4 has {len(names)}: ours {ours_names}"
    else:                                             # compared in order; names recorded when they differ
        if ours_names != names:
            out["names_differ"] = f"ours {ours_names[:4]}... lme4 {names[:4]}..."
        pick = lambda d: [d[k] for k in ours_names]  # noqa: E731
        out["d_fixed"] = _rel(pick(ours["params"]), list(ref["fixed"].values()))
        out["d_se"] = _rel(pick(ours["bse"]), list(ref["se"].values()))
        dfs = ref.get("df_satterthwaite")
        if dfs is not None:
            dfs = list(dfs.values()) if isinstance(dfs, dict) else (dfs if isinstance(dfs, list) else [dfs])
            out["d_df"] = _rel(pick(ours["df"]), dfs)
    sds = [v["sdcor"] for v in ref["varcorr"] if v["var2"] is None]
    cors = [v["sdcor"] for v in ref["varcorr"] if v["var2"] is not None]
    out["d_sd"] = _rel(sorted(ours["sds"]), sorted(sds))
    out["d_corr"] = _rel(sorted(ours["corr"]), sorted(cors)) if cors else 0.0
    out["d_loglik"] = ours["loglik"] - ref["loglik"]
    out["n_obs_lme4"] = ref["n_obs"]
    out["time_lme4"] = ref["time"]
    out["ratio"] = ours["time"] / ref["time"] if ref["time"] else None
    worst = max(out.get(k, 0.0) for k in ("d_fixed", "d_se", "d_sd", "d_corr"))
    if out["status"] == "ok":
        if out["d_loglik"] < -1e-6 * abs(ref["loglik"]) or ours["n_obs"] != ref["n_obs"]:
            out["status"] = "mismatch"
        elif worst > 1e-4:
            # parameters apart with our logLik at least lme4's: lme4 stopped short of a higher optimum, or
            # the optimum is flat (the two logLiks equal to 1e-9 relative, ours not lower beyond rounding)
            gain = out["d_loglik"] / max(abs(ref["loglik"]), 1.0)
            out["status"] = ("ok (lme4 stopped short)" if gain > 1e-9 else
                             "ok (flat optimum)" if gain > -1e-12 else "mismatch")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--filter", default=".")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=120)
    a = ap.parse_args()
    ref = json.loads((HERE / "lme4_battery.json").read_text())["fits"]
    results = {}
    for fid, case in ref.items():
        if not re.search(a.filter, fid) or "error" in case:
            continue
        r = compare(case, run_case(case, a.reps, a.timeout))
        results[fid] = r
        print(f"{fid:28s} {r['status']:10s} {r.get('d_loglik', '')!s:24s} {r.get('message', '')[:120]}", flush=True)
    path = HERE / ("results.json" if a.filter == "." else "results_filtered.json")
    path.write_text(json.dumps(results, indent=1, sort_keys=True, default=float))
    lines = ["| fit | status | d fixed | d SE | d SD | d corr | d df | logLik ours-lme4 | t ours (s) | t lme4 (s) | ratio | message |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    g = lambda r, k: "" if r.get(k) is None else (f"{r[k]:.2g}" if isinstance(r[k], float) else str(r[k]))  # noqa: E731
    for fid, r in results.items():
        lines.append(f"| {fid} | {r['status']} | " + " | ".join(g(r, k) for k in
                     ("d_fixed", "d_se", "d_sd", "d_corr", "d_df", "d_loglik", "time", "time_lme4", "ratio"))
                     + f" | {(r.get('message') or r.get('names_differ') or '')[:100].replace('|', '/')} |")
    counts = pd.Series([r["status"] for r in results.values()]).value_counts().to_dict()
    (path.with_suffix(".md")).write_text(f"# lme4 battery\n\nCounts: {counts}\n\n" + "\n".join(lines) + "\n")
    print(counts)


if __name__ == "__main__":
    main()
