"""Seeded random designs for differential testing against lme4 (issue 18): each seed gives a data set and a
formula from one family (balanced/unbalanced, singletons, boundary, near-collinear, large offset, scales
1e-8..1e8, rare levels, nested, crossed, slopes, missing values, weights with and without an offset)."""
from __future__ import annotations

import numpy as np
import pandas as pd

FAMILIES = ("balanced", "unbalanced", "singletons", "boundary", "collinear", "offset1000", "scale", "rare",
            "nested", "crossed", "slopes", "missing", "weights")


def design(seed: int) -> tuple[pd.DataFrame, str, str, str | None]:
    """(data, formula, family, weights column or None) for ``seed``."""
    rng = np.random.default_rng(seed)
    fam = FAMILIES[seed % len(FAMILIES)]
    G = int(rng.integers(3, 15))
    per = int(rng.integers(2, 8))
    sizes = np.full(G, per) if fam == "balanced" else rng.integers(1 if fam == "singletons" else 2, 2 * per + 2, G)
    g = np.repeat(np.arange(G), sizes)
    n = len(g)
    x = rng.normal(size=n)
    sd_g = 0.0 if fam == "boundary" else float(rng.uniform(0.3, 2))
    u = rng.normal(scale=sd_g, size=G)
    y = 1 + 0.5 * x + u[g] + rng.normal(size=n)
    d = pd.DataFrame({"y": y, "x": x, "g": [f"g{j}" for j in g]})
    formula, w = "y ~ x + (1 | g)", None
    if fam == "collinear":
        d["x2"] = d["x"] + rng.normal(scale=1e-6, size=n) + 1
        formula = "y ~ x + x2 + (1 | g)"
    elif fam == "offset1000":
        d["x"] = 1000 + 0.01 * x
        d["y"] = 1 + 50 * (d["x"] - 1000) + u[g] + rng.normal(size=n) * 0.5
        formula = "y ~ x + (x | g)" if rng.random() < 0.5 else "y ~ x + (1 | g)"
    elif fam == "scale":
        c = 10.0 ** int(rng.integers(-8, 9))
        d["y"] = y * c
    elif fam == "rare":
        d["f"] = np.where(rng.random(n) < 0.05, "rare", "common")
        d.loc[0, "f"] = "rare"
        formula = "y ~ x + f + (1 | g)"
    elif fam == "nested":
        d["h"] = [f"h{v}" for v in rng.integers(0, 3, n)]
        formula = "y ~ x + (1 | g/h)"
    elif fam == "crossed":
        d["h"] = [f"h{v}" for v in rng.integers(0, 4, n)]
        formula = "y ~ x + (1 | g) + (1 | h)"
    elif fam == "slopes":
        d["y"] = d["y"] + rng.normal(scale=0.5, size=G)[g] * x
        formula = "y ~ x + (x | g)"
    elif fam == "missing":
        d.loc[rng.random(n) < 0.1, "y"] = np.nan
        d.loc[rng.random(n) < 0.05, "x"] = np.nan
    elif fam == "weights":
        d["w"] = rng.uniform(0.5, 2, n)
        w = "w"
        if rng.random() < 0.5:                      # and an offset: lmer's offset() in the formula
            d["z"] = rng.normal(size=n)
            d["y"] = d["y"] + d["z"]
            formula = "y ~ x + offset(z) + (1 | g)"
    return d, formula, fam, w


def write_batch(seeds, out_dir) -> None:
    """CSV per seed plus manifest.csv (seed, family, formula, weights) for fit_lme4.R."""
    from pathlib import Path
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in seeds:
        d, f, fam, w = design(s)
        d.to_csv(out / f"seed{s}.csv", index=False, na_rep="")
        rows.append({"seed": s, "family": fam, "formula": f, "weights": w or ""})
    pd.DataFrame(rows).to_csv(out / "manifest.csv", index=False)
