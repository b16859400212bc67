"""The committed R reference values really come from R.

Re-runs ``tests/reference/make_reference.R`` into a temporary file and checks that
the fresh JSON equals the committed ``tests/reference/lme4_reference.json``:
numbers within 1e-6 relative, everything else exactly, ignoring ``meta`` and every
``time_seconds``.  Skipped when Rscript or one of the R packages is missing.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REFERENCE_DIR = Path(__file__).parent / "reference"
SCRIPT = REFERENCE_DIR / "make_reference.R"
COMMITTED = REFERENCE_DIR / "lme4_reference.json"
R_PACKAGES = ("lme4", "nlme", "lmerTest", "jsonlite")
IGNORED_KEYS = {"meta", "time_seconds"}
REL_TOL = 1e-6
ABS_TOL = 1e-10


def _r_missing() -> str | None:
    """Why the live check cannot run, or None when it can."""
    rscript = shutil.which("Rscript")
    if rscript is None:
        return "Rscript is not on PATH"
    check = (
        "pkgs <- c(" + ", ".join(f'"{p}"' for p in R_PACKAGES) + "); "
        "miss <- pkgs[!vapply(pkgs, requireNamespace, logical(1), quietly = TRUE)]; "
        "cat(miss, sep = ' '); quit(status = if (length(miss)) 1 else 0)"
    )
    try:
        proc = subprocess.run(
            [rscript, "-e", check], capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"Rscript did not run: {exc}"
    if proc.returncode != 0:
        return f"R packages missing: {proc.stdout.strip() or proc.stderr.strip()}"
    return None


def _differences(committed, fresh, path="$"):
    """Paths where the two JSON trees disagree, with both values."""
    if isinstance(committed, dict) and isinstance(fresh, dict):
        out = []
        keys_c = set(committed) - IGNORED_KEYS
        keys_f = set(fresh) - IGNORED_KEYS
        for key in sorted(keys_c ^ keys_f):
            out.append(f"{path}.{key}: only in {'committed' if key in keys_c else 'fresh'}")
        for key in sorted(keys_c & keys_f):
            out.extend(_differences(committed[key], fresh[key], f"{path}.{key}"))
        return out
    if isinstance(committed, list) and isinstance(fresh, list):
        if len(committed) != len(fresh):
            return [f"{path}: length {len(committed)} != {len(fresh)}"]
        out = []
        for i, (c, f) in enumerate(zip(committed, fresh)):
            out.extend(_differences(c, f, f"{path}[{i}]"))
        return out
    numeric = (int, float)
    if (
        isinstance(committed, numeric)
        and isinstance(fresh, numeric)
        and not isinstance(committed, bool)
        and not isinstance(fresh, bool)
    ):
        if math.isclose(committed, fresh, rel_tol=REL_TOL, abs_tol=ABS_TOL):
            return []
        return [f"{path}: committed {committed!r} != fresh {fresh!r}"]
    if isinstance(committed, str) and isinstance(fresh, str) and _NUMBER.sub("#", committed) == _NUMBER.sub("#", fresh):
        # a message quoting a number (lme4's "max|grad| = 0.00246681"): the text equal, the numbers close
        a, b = (float(v) for v in _NUMBER.findall(committed)), (float(v) for v in _NUMBER.findall(fresh))
        if all(math.isclose(x, y, rel_tol=1e-4, abs_tol=ABS_TOL) for x, y in zip(a, b)):
            return []
    if committed != fresh or type(committed) is not type(fresh):
        return [f"{path}: committed {committed!r} != fresh {fresh!r}"]
    return []


_NUMBER = re.compile(r"-?\d+\.\d+(?:e[-+]?\d+)?")


def test_differences_helper():
    """The comparison itself: tolerance, ignored keys, structure."""
    assert _differences({"a": 1.0, "time_seconds": 1}, {"a": 1.0 + 1e-9, "time_seconds": 2}) == []
    assert _differences({"a": [1, None, "x"]}, {"a": [1, None, "x"]}) == []
    assert _differences({"a": 1.0}, {"a": 1.001})
    assert _differences({"a": True}, {"a": 1})
    assert _differences({"a": [1]}, {"a": [1, 2]})
    assert _differences({"w": "max|grad| = 0.00246681 (tol"}, {"w": "max|grad| = 0.0024668 (tol"}) == []
    assert _differences({"w": "max|grad| = 0.00246681 (tol"}, {"w": "max|grad| = 0.0031 (tol"})
    assert _differences({"a": 1}, {"b": 1})


@pytest.mark.slow
def test_committed_reference_matches_fresh_r_run(tmp_path):
    reason = _r_missing()
    if reason is not None:
        pytest.skip(reason)
    assert COMMITTED.exists(), f"{COMMITTED} is missing; run Rscript {SCRIPT}"
    out = tmp_path / "fresh_reference.json"
    proc = subprocess.run(
        [shutil.which("Rscript"), str(SCRIPT), str(out)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, f"make_reference.R failed:\n{proc.stdout}\n{proc.stderr}"
    committed = json.loads(COMMITTED.read_text())
    fresh = json.loads(out.read_text())
    diffs = _differences(committed, fresh)
    assert not diffs, f"{len(diffs)} differences, first ones:\n" + "\n".join(diffs[:40])
