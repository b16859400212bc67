"""Speed on the real-data battery: lmm_symbolic against lme4's lmer and lmerTest (fit + Satterthwaite df),
and statsmodels' MixedLM where it fits the model, in one run on this machine.

Usage: python benchmarks/speed/run.py [--filter REGEX] [--min-seconds S]
Starts speed.R (one Rscript process) and, model by model, has it time lme4, then times ``lmm_symbolic.fit``
the same way right after (data in memory, one warm-up, three blocks of k fits, the median block / k), so a
busy machine slows both alike. Writes results.json and results.md next to this script: the wall-clock and
CPU time per fit of each, the ratios lmm_symbolic / lme4 (below 1: faster than lme4) and logLik ours - lme4
(never negative beyond rounding). Speed is measured here, never asserted in tests.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "lme4_battery"))
from run import load  # noqa: E402  (the battery's loader: Categoricals in R's level order)


def per_fit(f, min_seconds: float) -> tuple[float, float]:
    """(wall, CPU) seconds per call: one warm-up, three blocks of k calls, the median block / k."""
    f()
    t0 = time.perf_counter()
    f()
    t1 = time.perf_counter() - t0
    k = max(1, int(min_seconds / 3 / max(t1, 1e-4)) + 1)
    wall, cpu = [], []
    for _ in range(3):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(k):
            f()
        wall.append((time.perf_counter() - t0) / k)
        cpu.append((time.process_time() - c0) / k)
    return statistics.median(wall), statistics.median(cpu)


def statsmodels_fit(case: dict, data):
    """MixedLM for one grouping factor with a random intercept or (x | g); None where it does not apply."""
    m = re.fullmatch(r"\s*(\w+)\s*~\s*(.+?)\s*\+\s*\((1|\w+)\s*\|\s*(\w+)\)\s*", case["formula"])
    if not m or case.get("weights"):
        return None
    import statsmodels.formula.api as smf
    y, rhs, re_term, group = m.groups()
    if any(tok in rhs for tok in ("(", "|", "/")):
        return None
    kw = {} if re_term == "1" else {"re_formula": f"~{re_term}"}
    d = data.dropna(subset=[c for c in data.columns if c in case["formula"]])

    def f():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return smf.mixedlm(f"{y} ~ {rhs}", d, groups=d[group], **kw).fit(reml=case["method"] == "REML")
    return f


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--filter", default=".")
    ap.add_argument("--min-seconds", type=float, default=0.6)
    a = ap.parse_args()
    cases = json.loads((HERE.parent / "lme4_battery" / "lme4_battery.json").read_text())["fits"]
    r = subprocess.Popen(["Rscript", str(HERE / "speed.R"), str(a.min_seconds)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, bufsize=1)
    import lmm_symbolic as lmm
    rows = {}
    for fid, case in cases.items():
        if "error" in case or not re.search(a.filter, fid):
            continue
        r.stdin.write(fid + "\n")
        r.stdin.flush()
        rt = json.loads(r.stdout.readline())
        data = load(case["dataset"])
        kw = {"method": case["method"]}
        if case.get("weights"):
            kw["weights"] = data[case["weights"]].to_numpy(float)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                fit = lmm.fit(case["formula"], data, **kw)
                t, t_cpu = per_fit(lambda: lmm.fit(case["formula"], data, **kw), a.min_seconds)
            except lmm.LMMError as e:
                rows[fid] = {"formula": case["formula"], "error": str(e)[:200]}
                continue
        sm = statsmodels_fit(case, data)
        t_sm = None
        if sm is not None:
            try:
                t_sm = per_fit(sm, a.min_seconds)[0]
            except Exception:  # noqa: BLE001 -- statsmodels refuses some designs
                t_sm = None
        rows[fid] = {"formula": case["formula"], "n": fit.n_obs, "ours": t, "ours_cpu": t_cpu, "lmer": rt["lmer"],
                     "lmer_cpu": rt["lmer_cpu"], "lmerTest": rt["lmerTest"], "statsmodels": t_sm,
                     "ratio_lmer": t / rt["lmer"], "ratio_lmer_cpu": t_cpu / rt["lmer_cpu"] if rt["lmer_cpu"] else None,
                     "ratio_lmerTest": t / rt["lmerTest"] if rt["lmerTest"] else None,
                     "d_loglik": fit.loglik - rt["loglik"], "evaluations": fit.opt.evaluations}
        x = rows[fid]
        print(f"{fid:28s} ours {t * 1e3:9.2f} ms  lmer {rt['lmer'] * 1e3:9.2f} ms  ratio {x['ratio_lmer']:.3f}"
              f" (CPU {x['ratio_lmer_cpu'] or float('nan'):.3f})  dlogLik {x['d_loglik']:+.2e}", flush=True)
    r.stdin.close()
    r.wait()
    ratios = [x["ratio_lmer"] for x in rows.values() if "ratio_lmer" in x]
    cpu = [x["ratio_lmer_cpu"] for x in rows.values() if x.get("ratio_lmer_cpu")]
    summary = {"machine": platform.platform(), "python": sys.version.split()[0], "models": len(ratios),
               "faster_than_lmer": sum(r < 1 for r in ratios),
               "median_ratio": statistics.median(ratios) if ratios else None,
               "worst_ratio": max(ratios) if ratios else None,
               "median_ratio_cpu": statistics.median(cpu) if cpu else None,
               "worst_ratio_cpu": max(cpu) if cpu else None}
    name = "results" if a.filter == "." else "results_filtered"
    (HERE / f"{name}.json").write_text(json.dumps({"summary": summary, "fits": rows}, indent=1))
    fmt = lambda v, k=1e3: "" if v is None else f"{v * k:.2f}"  # noqa: E731
    lines = ["# Speed: lmm_symbolic vs lme4 on the real-data battery (one run, this machine)", "",
             f"{summary['faster_than_lmer']} of {summary['models']} models faster than lmer; median time ratio "
             f"ours / lmer {summary['median_ratio']:.3f} (CPU time {summary['median_ratio_cpu']:.3f}), worst "
             f"{summary['worst_ratio']:.3f} (CPU {summary['worst_ratio_cpu']:.3f}). lmm_symbolic's time includes "
             "Satterthwaite's df, lmer's does not (lmerTest's column does).", "",
             "| fit | formula | n | ours (ms) | lmer (ms) | lmerTest (ms) | statsmodels (ms) | ours / lmer | "
             "CPU ours / lmer | ours / lmerTest | logLik ours - lme4 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for fid, x in rows.items():
        if "error" in x:
            lines.append(f"| {fid} | `{x['formula']}` | | error: {x['error'][:60]} | | | | | | | |")
            continue
        lines.append(f"| {fid} | `{x['formula'].replace('|', chr(92) + '|')}` | {x['n']} | {fmt(x['ours'])} | {fmt(x['lmer'])} | "
                     f"{fmt(x['lmerTest'])} | {fmt(x['statsmodels'])} | {x['ratio_lmer']:.3f} | "
                     f"{fmt(x['ratio_lmer_cpu'], 1)} | {fmt(x['ratio_lmerTest'], 1)} | {x['d_loglik']:+.1e} |")
    (HERE / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
