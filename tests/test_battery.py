"""The real-data lme4 battery (benchmarks/lme4_battery): every model fitted ML and REML must reach lme4's
optimum (logLik not below lme4's by more than 1e-6 relative) and its numbers (1e-4 relative) unless lme4
stopped short. Fits the last recorded run (results.json) found failing are xfail with the reason; fits that
hung are not run (run=False). InstEval-size fits are marked slow."""
import importlib.util
import json
from pathlib import Path

import pytest

BATTERY = Path(__file__).parent.parent / "benchmarks" / "lme4_battery"
REF = json.loads((BATTERY / "lme4_battery.json").read_text())["fits"]
_results = BATTERY / "results.json"
RECORDED = json.loads(_results.read_text()) if _results.exists() else {}
_spec = importlib.util.spec_from_file_location("battery_run", BATTERY / "run.py")
runner = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runner)


CORE = {"sleep_slope", "cake_nested", "dyestuff", "pastes_nested", "penicillin_crossed", "machines_nested",
        "rail", "alfalfa", "gcsemv_na", "orange", "sleep_I2"}


def _params():
    for fid, case in REF.items():
        if "error" in case:
            continue
        marks = []
        if case["n_obs"] > 5000 or case["model"] not in CORE:   # the whole battery takes ~3 min: slow
            marks.append(pytest.mark.slow)
        rec = RECORDED.get(fid)
        if rec is None and case["dataset"] == "InstEval":
            rec = {"status": "timeout", "message": "not yet measured with lmm_symbolic (73k rows, crossed)"}
        if rec is not None and not rec["status"].startswith("ok"):
            reason = f"{rec['status']}: {rec.get('message') or 'logLik ours-lme4 %s' % rec.get('d_loglik')}"
            marks.append(pytest.mark.xfail(strict=False, reason=reason[:200], run=rec["status"] != "timeout"))
        yield pytest.param(fid, marks=marks, id=fid)


@pytest.mark.parametrize("fid", list(_params()))
def test_battery_fit_matches_lme4(fid):
    ref = REF[fid]
    r = runner.compare(ref, runner.run_case(ref, reps=0, timeout=60))
    assert r["status"].startswith("ok"), r.get("message", r)
    assert r["n_obs"] == ref["n_obs"]
    assert r["d_loglik"] >= -1e-6 * abs(ref["loglik"])
    if r["status"] == "ok":
        assert max(r["d_fixed"], r["d_se"], r["d_sd"], r["d_corr"]) <= 1e-4


def test_sidecar_keeps_ordered_factors_and_r_level_order():
    d = runner.load("cake")
    assert d["temperature"].cat.ordered
    assert list(d["temperature"].cat.categories) == ["175", "185", "195", "205", "215", "225"]
    alf = runner.load("Alfalfa")
    assert len(alf) == 72 and alf["Date"].isna().sum() == 0     # the level "None" is not missing
    gcse = runner.load("Gcsemv")
    assert gcse["course"].isna().sum() > 0                       # empty cells are missing


@pytest.mark.slow
def test_live_r_regenerates_a_battery_model(tmp_path):
    import shutil
    import subprocess
    if shutil.which("Rscript") is None:
        pytest.skip("R not installed")
    # one quick model (REPS=1, filter) rewrites lme4_battery.json: run on a copy of the script and data
    work = tmp_path / "b"
    shutil.copytree(BATTERY, work, ignore=shutil.ignore_patterns("results*"))
    subprocess.run(["Rscript", str(work / "battery.R"), "1", "^dyestuff$"], check=True, capture_output=True,
                   timeout=300)
    fresh = json.loads((work / "lme4_battery.json").read_text())["fits"]
    for fid in ("dyestuff_ml", "dyestuff_reml"):
        assert fresh[fid]["loglik"] == pytest.approx(REF[fid]["loglik"], rel=1e-8)
        assert fresh[fid]["fixed"] == pytest.approx(REF[fid]["fixed"], rel=1e-6)
