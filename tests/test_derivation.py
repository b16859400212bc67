"""The derivation: the toy's closed forms, and the structured forms against brute-force dense sympy."""
import numpy as np
import pandas as pd
import pytest
import sympy as sp

import lmm_symbolic as lmm
from lmm_symbolic.derivation import m, random_intercept_block, sigma, sigma_s

TOY = "Resp ~ Treat + (1|Ind)"


@pytest.fixture(scope="module")
def toy():
    return lmm.derive(TOY, lmm.datasets.load("toy"))


def test_toy_eq11_is_sigma4_times_square(toy):
    assert toy.equation(11).expr.rhs == sigma**4 * (sigma**2 + 2 * sigma_s**2) ** 2
    assert sp.expand(toy.det) == 4 * sigma_s**4 * sigma**4 + 4 * sigma_s**2 * sigma**6 + sigma**8


def test_toy_eq12_is_a_bracket_over_sigma2_times_sigma2_plus_2_sigma_s2(toy):
    num, den = sp.fraction(sp.together(toy.quadratic_form))
    assert sp.factor(den) == sigma**2 * (sigma**2 + 2 * sigma_s**2)
    y = sp.Matrix(toy.symbols.y)
    X = sp.Matrix([[1, 0], [1, 1], [1, 0], [1, 1]])
    r = y - X * sp.Matrix(toy.symbols.beta)
    dense = (r.T * toy.sigma_matrix.inv() * r)[0, 0]
    assert sp.simplify(toy.quadratic_form - dense) == 0


def test_block_identities_for_symbolic_size():
    blk = random_intercept_block()
    assert sp.simplify(blk.det - sigma ** (2 * m - 2) * (sigma**2 + m * sigma_s**2)) == 0
    assert sp.simplify(blk.W[0, 0] - sigma_s**2 / (sigma**2 + m * sigma_s**2)) == 0
    for size in range(1, 6):  # the symbolic-m forms against dense sympy for m = 1..5
        S = sigma**2 * sp.eye(size) + sigma_s**2 * sp.ones(size, size)
        assert sp.simplify(S.det() - blk.det.subs(m, size)) == 0
        inv = (sp.eye(size) - blk.W[0, 0].subs(m, size) * sp.ones(size, size)) / sigma**2
        assert sp.simplify(S.inv() - inv) == sp.zeros(size, size)


def test_equations_are_numbered_and_render(toy):
    eqs = toy.equations
    assert [e.number for e in eqs] == list(range(1, 13))
    for e in eqs:
        assert e._repr_latex_().startswith(rf"$$\textbf{{Eq. {e.number}}}")
        assert e.latex
    assert len(toy.equation(1).expr) == 4                    # one equation per observation
    n, Q = sp.Symbol("n", positive=True, integer=True), sp.Symbol("Q")
    det = sp.Determinant(sp.MatrixSymbol("Sigma", 4, 4))
    assert toy.equation(9).expr.rhs == (2 * sp.pi) ** (-n / 2) / sp.sqrt(det) * sp.exp(-Q / 2)
    assert r"\left(2 \pi\right)^{- \frac{n}{2}}" in toy.equation(9).latex
    assert toy.equation(10).expr.rhs == -n / 2 * sp.log(2 * sp.pi) - sp.log(det) / 2 - Q / 2
    assert toy.equation(5).expr.rhs == sp.MatrixSymbol("X", 4, 2) * sp.MatrixSymbol("beta", 2, 1)


def test_cell_means_gives_tutorial_beta1_beta2():
    d = lmm.derive("Resp ~ 0 + C(Treat) + (1|Ind)", lmm.datasets.load("toy"))
    assert [b.name for b in d.symbols.beta] == ["beta_1", "beta_2"]
    rows = d.equation(1).expr
    y11, y21 = d.symbols.y[0], d.symbols.y[1]
    b1, b2 = d.symbols.beta
    assert rows[0].lhs == y11 and rows[0].rhs.has(b1) and not rows[0].rhs.has(b2)
    assert rows[1].lhs == y21 and rows[1].rhs.has(b2)
    assert "{\\beta}_{i}" in d.equation(2).latex


def _random_design(rng, n_groups, max_size, p):
    sizes = rng.integers(1, max_size + 1, n_groups)
    codes = rng.permutation(np.repeat(np.arange(n_groups), sizes))
    n = len(codes)
    frame = pd.DataFrame({"g": codes, "y": rng.integers(-9, 10, n)})
    for k in range(p):
        frame[f"x{k}"] = rng.integers(-3, 4, n)
    rhs = " + ".join([f"x{k}" for k in range(p)] or ["1"])
    return frame, f"y ~ {rhs} + (1|g)"


@pytest.mark.parametrize("seed", range(12))
def test_structured_forms_equal_dense_sympy(seed):
    """|Sigma|, Sigma^-1 and the quadratic form against dense Matrix.det()/inv() on designs of <= 12 rows."""
    rng = np.random.default_rng(seed)
    frame, formula = _random_design(rng, n_groups=int(rng.integers(2, 5)), max_size=3, p=int(rng.integers(0, 3)))
    while frame["g"].nunique() < 2 or len(frame) <= frame["g"].nunique() or len(frame) > 12:
        frame, formula = _random_design(rng, 3, 3, 1)
    try:
        d = lmm.derive(formula, frame)
    except lmm.LMMError:
        pytest.skip("this random design is not identifiable")
    S = d.sigma_matrix
    assert sp.simplify(S.det() - d.det) == 0
    assert sp.simplify(S.inv() - d.inverse) == sp.zeros(*S.shape)
    r = sp.Matrix(d.residuals)
    assert sp.simplify((r.T * S.inv() * r)[0, 0] - d.quadratic_form) == 0


def test_loglik_and_reml_loglik_match_dense_numbers(toy):
    import scipy.stats

    data = lmm.datasets.load("toy")
    X = np.array([[1, 0], [1, 1], [1, 0], [1, 1.0]])
    y = data["Resp"].to_numpy(float)
    at = {sigma: 3.0, sigma_s: 5.0, **dict(zip(toy.symbols.beta, (6.0, 9.5))), **dict(zip(toy.symbols.y, y))}
    Sig = np.array(toy.sigma_matrix.subs(at), dtype=float)
    mean = X @ np.array([6.0, 9.5])
    dense = scipy.stats.multivariate_normal(mean, Sig).logpdf(y)
    assert float(toy.loglik.subs(at)) == pytest.approx(dense, rel=1e-12)
    info = X.T @ np.linalg.solve(Sig, X)
    reml = dense - 0.5 * np.linalg.slogdet(info)[1] + np.log(2 * np.pi)
    assert float(toy.reml_loglik.subs(at)) == pytest.approx(reml, rel=1e-12)


def test_large_design_keeps_eq11_exact_and_eq12_consistent():
    rng = np.random.default_rng(3)
    G = 400
    sizes = rng.integers(1, 21, G)
    codes = np.repeat(np.arange(G), sizes)
    frame = pd.DataFrame({"g": codes, "x": rng.normal(size=len(codes))})
    frame["y"] = 1 + 2 * frame["x"] + rng.normal(size=G)[codes] + rng.normal(size=len(codes))
    d = lmm.derive("y ~ x + (1|g)", frame)
    assert d.inverse is None and not d.symbolic_y
    expected = sp.Mul(*[(sigma ** (2 * (s - 1)) * (sigma**2 + s * sigma_s**2)) for s in sizes])
    assert sp.simplify(d.det / expected) == 1
    # Eq. 12 at numbers equals the per-group dense evaluation
    sv, ssv, b0, b1 = 1.3, 0.7, 0.9, 2.1
    value = float(d.quadratic_form.subs({sigma: sv, sigma_s: ssv, d.symbols.beta[0]: b0, d.symbols.beta[1]: b1}))
    r = frame["y"].to_numpy() - b0 - b1 * frame["x"].to_numpy()
    dense = sum(r[codes == g] @ np.linalg.solve(sv**2 * np.eye(s) + ssv**2 * np.ones((s, s)), r[codes == g])
                for g, s in enumerate(sizes))
    assert value == pytest.approx(dense, rel=1e-9)
    assert "\\vdots" in d.equation(3).latex and "\\cdots" in d.equation(3).latex


def test_to_dict_strings_parse_back(toy):
    out = toy.to_dict()
    names = {name: sp.Symbol(name) for name in ["sigma", "sigma_s", *out["symbols"]["y"], *out["symbols"]["beta"]]}
    det = sp.sympify(out["det"], locals=names)
    assert sp.expand(det - sp.expand(toy.det).subs({sigma: names["sigma"], sigma_s: names["sigma_s"]})) == 0
    q = sp.sympify(out["quadratic_form"], locals=names)
    plain = {s: names[s.name] for s in toy.quadratic_form.free_symbols}
    assert sp.simplify(q - toy.quadratic_form.xreplace(plain)) == 0
    assert out["symbols"]["y"] == ["y_11", "y_21", "y_12", "y_22"]
    assert out["symbols"]["beta"] == ["beta_0", "beta_1"]
    inv = sp.Matrix(sp.sympify(out["inverse"], locals=names))
    assert inv.shape == (4, 4)


def test_latex_document_is_standalone(toy, tmp_path):
    doc = toy.to_latex_document()
    assert doc.startswith(r"\documentclass") and doc.rstrip().endswith(r"\end{document}")
    for k in range(1, 13):
        assert f"Eq. {k}:" in doc
    import shutil
    import subprocess
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex is not installed")
    tex = tmp_path / "eq.tex"
    tex.write_text(doc)
    res = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", tex.name], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:]
    assert (tmp_path / "eq.pdf").exists()


@pytest.mark.parametrize("formula, dataset", [
    ("Reaction ~ Days + (Days|Subject)", "sleepstudy"),
    ("Reaction ~ Days + (1|Subject) + (0 + Days|Subject)", "sleepstudy"),
    ("strength ~ 1 + (1|batch/cask)", "Pastes"),
    ("diameter ~ 1 + (1|plate) + (1|sample)", "Penicillin"),
])
def test_general_models_derive_and_render(formula, dataset):
    d = lmm.derive(formula, lmm.datasets.load(dataset))
    assert [e.number for e in d.equations] == list(range(1, 13))
    assert all(e.latex for e in d.equations)
    out = d.to_dict()
    assert out["symbols"]["variance"]
    assert out["det"] and out["quadratic_form"] and out["loglik"]


def test_nested_determinant_factorises_by_batch():
    d = lmm.derive("strength ~ 1 + (1|batch/cask)", lmm.datasets.load("Pastes"))
    sc, sb = (sp.Symbol(n, positive=True) for n in ("sigma_cask_batch_Intercept", "sigma_batch_Intercept"))
    assert d.det == sigma**60 * (sigma**2 + 2 * sc**2) ** 20 * (sigma**2 + 6 * sb**2 + 2 * sc**2) ** 10


def _slope_frame():
    return pd.DataFrame({"y": [1, 4, 2, 3, 7, 5, 6, 2, 4], "x": [0, 1, 2, 0, 1, 2, 0, 1, 2],
                         "g": [1, 1, 1, 2, 2, 2, 3, 3, 3]})


@pytest.mark.parametrize("formula, frame", [
    ("y ~ x + (x|g)", _slope_frame()),
    ("y ~ x + (1|g) + (0 + x|g)", _slope_frame()),
    ("y ~ 1 + (1|a) + (1|b)", pd.DataFrame({"y": [1, 4, 2, 3, 7, 5], "a": [1, 1, 2, 2, 3, 3],
                                            "b": [1, 2, 1, 2, 1, 2]})),
])
def test_general_closed_forms_equal_dense_sympy(formula, frame):
    """The lemma/Woodbury blocks against dense Matrix.det()/inv() on small slope and crossed designs."""
    d = lmm.derive(formula, frame)
    S = d.sigma_matrix
    assert sp.simplify(S.det() - d.det) == 0
    r = sp.Matrix(d.residuals)
    assert sp.simplify((r.T * S.inv() * r)[0, 0] - d.quadratic_form) == 0
    if d.inverse is not None:
        assert sp.simplify(S.inv() - d.inverse) == sp.zeros(*S.shape)


def test_general_loglik_matches_the_fit():
    """Eq. 10 of the slope model, at the REML/ML estimates, equals the fit's log-likelihood."""
    data = lmm.datasets.load("sleepstudy")
    d = lmm.derive("Reaction ~ Days + (1|Subject) + (0 + Days|Subject)", data)
    fit = lmm.fit("Reaction ~ Days + (1|Subject) + (0 + Days|Subject)", data, method="ML")
    sd = dict(zip(fit.variance_components["term"], fit.variance_components["sd"]))
    at = {sigma: fit.sigma, sp.Symbol("sigma_Subject_Intercept", positive=True): sd["(Intercept)"],
          sp.Symbol("sigma_Subject_Days", positive=True): sd["Days"],
          **dict(zip(d.symbols.beta, fit.params.values))}
    assert float(d.loglik.subs(at)) == pytest.approx(fit.loglik, rel=1e-9)


@pytest.mark.parametrize("formula", ["Resp ~ Treat + (1|Ind)", "Resp ~ 0 + C(Treat) + (1|Ind)"])
def test_readable_eq12_is_the_derived_quadratic_form(formula):
    """Issue 14: Eq. 12 shown one line per group, residuals y - X beta, w collected -- and it is the same
    expression as the derivation's quadratic form (checked by the verifier on its plain-text twin)."""
    import lmm_symbolic as lmm

    d = lmm.derive(formula, lmm.datasets.load("toy"))
    text = d.quadratic_text()
    body, weight = text.split("\nwith w = ")
    lines = body.replace("Q =", "").split("\n")
    assert len(lines) == 2 and "(y_11 - beta_" in lines[0] and "-beta" not in text   # no (-beta_0 + y_11)
    expr = " ".join(body.replace("Q =", "").split()).replace("[", "(").replace("]", ")").replace("w*", f"({weight})*")
    assert lmm.verify(d, "quadratic_form", expr).equal
    latex = d.equation(12).latex
    assert latex.count(r"\frac{1}{\sigma^{2}}\Big[") == 2 and r"\begin{aligned}" in latex
    assert d.loglik_latex().startswith(r"\log L = -2\log 2\pi - \log \sigma^{2} - \log \left(\sigma^{2} + 2 \sigma_{s}^{2}\right)")
    assert r"I_{2}" in d.equation(6).latex and r"\mathbb{I}" not in d.equation(6).latex


def test_plain_text_forms_read_like_the_tutorial():
    import lmm_symbolic as lmm

    d = lmm.derive("Resp ~ 0 + C(Treat) + (1|Ind)", lmm.datasets.load("toy"))
    assert "y_21 = beta_2 + u_1 + epsilon_21" in str(d.equation(1))
    assert "KK__T" not in str(d.equation(7)) and "K K^T" in str(d.equation(7))
    slope = lmm.derive("Reaction ~ Days + (Days|Subject)", lmm.datasets.load("sleepstudy"))
    eq1 = str(slope.equation(1))
    assert "+ 0 +" not in eq1 and "y_1_1 = beta_0 + u_0_1 + epsilon_1_1" in eq1
    eq11 = str(slope.equation(11))
    assert "σ₀" in eq11 and "Subject_Intercept" not in eq11.split("where")[0] and "where sigma_0: SD of Subject" in eq11
    names = slope.symbols.by_name()
    assert names["sigma_0"] is names["sigma_Subject_Intercept"] and names["rho"] is names["rho_Subject_Intercept_Days"]
