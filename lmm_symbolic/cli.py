"""The ``lmm-symbolic`` command: derive, fit (with --predict, --bootstrap, --profile), anova, verify and
the tutorial demo.

Every error the package raises on purpose becomes one line on stderr and exit code 2; warnings (dropped
rows, aliased columns, singular fits) go to stderr as one line each.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import sympy as sp

from . import datasets
from .errors import LMMError, LMMWarning


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmm-symbolic", description="The linear mixed model derived with sympy, "
                                "fitted with scipy, checked against lme4.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("derive", help="derive Eq. 1-12 in closed form")
    d.add_argument("data", help="CSV file (or the name of a shipped data set, e.g. toy)")
    d.add_argument("formula", help="lme4 formula, e.g. 'Resp ~ Treat + (1|Ind)'")
    out = d.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the derivation as JSON")
    out.add_argument("--latex", metavar="FILE", help="write a standalone LaTeX document of Eq. 1-12")
    f = sub.add_parser("fit", help="fit by REML (default) or ML")
    f.add_argument("data")
    f.add_argument("formula")
    how = f.add_mutually_exclusive_group()
    how.add_argument("--reml", dest="method", action="store_const", const="REML")
    how.add_argument("--ml", dest="method", action="store_const", const="ML")
    f.add_argument("--json", action="store_true", help="print the result as JSON")
    f.add_argument("--kinship", metavar="CSV", help="an n x n relationship matrix K (CSV, no header, rows in "
                   "the data's order); the formula then has no random term: Sigma = sigma_s^2 K + sigma^2 I")
    f.add_argument("--predict", metavar="NEW.csv", help="print predictions for the rows of NEW.csv: with the "
                   "random effects (a new level gets its population-level value) and without them")
    f.add_argument("--bootstrap", metavar="N", type=int, help="a parametric bootstrap of N refits: percentile "
                   "intervals of every parameter and the share of boundary (singular) refits")
    f.add_argument("--profile", action="store_true", help="profile confidence intervals of every parameter "
                   "(lme4's confint), the variance components included")
    f.add_argument("--seed", type=int, default=None, help="seed of --bootstrap")
    f.set_defaults(method="REML")
    a = sub.add_parser("anova", help="likelihood-ratio tests of a sequence of models (lme4's anova)")
    a.add_argument("data")
    a.add_argument("formulas", nargs="+", metavar="FORMULA", help="two or more nested formulas")
    how = a.add_mutually_exclusive_group()
    how.add_argument("--reml", dest="method", action="store_const", const="REML")
    how.add_argument("--ml", dest="method", action="store_const", const="ML")
    a.add_argument("--json", action="store_true")
    a.set_defaults(method="REML")
    v = sub.add_parser("verify", help="check a hand-derived expression")
    v.add_argument("data")
    v.add_argument("formula")
    v.add_argument("--quantity", required=True,
                   help="det, logdet, inverse, quadratic_form, loglik, reml_loglik, sigma, kinship, "
                   "gls_information, gls_estimator, beta_covariance, profiled_loglik, deviance, reml_criterion, "
                   "likelihood, ml_sigma2, ml_sigma_s2, reml_sigma2, reml_sigma_s2 (closed forms, balanced designs), "
                   "conditional_modes (u_hat), score_<symbol> (score_sigma2 for d/d sigma^2)")
    src = v.add_mutually_exclusive_group(required=True)
    src.add_argument("--expr", help="the expression, plain (sigma**2, Sum(log(sigma**2 + m_j*sigma_s**2), "
                     "(j, 1, G))) or LaTeX (\\sigma^2, \\sum_{j=1}^{G}); one starting with '-' is read too "
                     "(--expr -2*log(2*pi) ...)")
    src.add_argument("--steps", metavar="FILE", help="a derivation, one expression a line: which lines equal "
                     "the quantity and the first step that breaks the chain")
    v.add_argument("--latex", action="store_true", help="read --expr as LaTeX")
    v.add_argument("--json", action="store_true")
    x = sub.add_parser("exercise", help="a small random design, questions and worked solutions")
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--groups", type=int, default=2)
    x.add_argument("--sizes", type=int, nargs="+")
    x.add_argument("--out", default="exercise", help="file stem: STEM.tex, STEM.ipynb, STEM.csv")
    sub.add_parser("demo", help="the tutorial on its toy data, in the terminal")
    return p


def _data(arg: str):
    """A shipped data set by name, else a CSV path."""
    return datasets.load(arg) if arg in datasets.names() else arg


def _expression_arguments(argv: list[str]) -> list[str]:
    """``--expr -2*log(2*pi) ...`` is the expression, not an option: joined as ``--expr=-2*...``."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--expr" and i + 1 < len(argv) and argv[i + 1].startswith("-") and \
                argv[i + 1] not in ("--latex", "--json", "--quantity", "-h", "--help"):
            out.append("--expr=" + argv[i + 1])
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


#: the exit status when the reader of stdout goes away (``... | head``): 128 + SIGPIPE, as a shell tool's
EXIT_BROKEN_PIPE = 141


def main(argv: list[str] | None = None) -> int:
    """Run one command; a reader that closes stdout early (``lmm-symbolic demo | head``) ends it quietly
    with :data:`EXIT_BROKEN_PIPE`, as the Python documentation recommends for SIGPIPE: stdout is pointed at
    devnull so the interpreter's final flush cannot fail again."""
    try:
        code = _main(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    return code


def _main(argv: list[str] | None = None) -> int:
    argv = _expression_arguments(list(sys.argv[1:] if argv is None else argv))
    args = _parser().parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LMMWarning)
        try:
            code = _COMMANDS[args.command](args)
        except LMMError as exc:
            _flush(caught)
            print(f"lmm-symbolic: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        except BrokenPipeError:
            raise
        except OSError as exc:  # e.g. --latex FILE in a folder that does not exist
            _flush(caught)
            print(f"lmm-symbolic: error: {exc.strerror or exc}: {exc.filename or ''}; check the path",
                  file=sys.stderr)
            return 2
        except Exception as exc:  # a bug: still one line, the traceback on request
            if os.environ.get("LMM_SYMBOLIC_TRACEBACK"):
                raise
            _flush(caught)
            print(f"lmm-symbolic: internal error: {type(exc).__name__}: {_one_line(exc)} (a bug in "
                  "lmm_symbolic; set LMM_SYMBOLIC_TRACEBACK=1 to see the traceback)", file=sys.stderr)
            return 3
        _flush(caught)
    return code


#: the longest message line printed (whatever a message quotes, stderr stays readable)
MAX_MESSAGE = 4000


def _one_line(text) -> str:
    """A message on one line: stderr gets exactly one line per error or warning, at most
    :data:`MAX_MESSAGE` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= MAX_MESSAGE else f"{line[:MAX_MESSAGE]}... ({len(line):,} characters in all)"


def _flush(caught) -> None:
    for w in caught:
        if issubclass(w.category, LMMWarning):
            print(f"lmm-symbolic: warning: {_one_line(w.message)}", file=sys.stderr)
    caught.clear()


def _derive(args) -> int:
    from . import derive
    d = derive(args.formula, _data(args.data))
    if args.json:
        print(json.dumps(d.to_dict(), indent=2))
    elif args.latex:
        with open(args.latex, "w", encoding="utf-8") as fh:
            fh.write(d.to_latex_document())
        print(f"wrote {args.latex}")
    else:
        for e in d.equations:
            print(_pretty(e))
    return 0


def _pretty(e) -> str:
    note = f"   ({e.note})" if e.note else ""
    body = e.text or sp.pretty(e.expr, use_unicode=True, order="none", wrap_line=False)
    return f"\nEq. {e.number}: {e.title}{note}\n{body}"


def _fit(args) -> int:
    from .progress import reporting
    with reporting():   # a long fit says what it is doing, on stderr
        return _fit_quietly(args)


def _fit_quietly(args) -> int:
    from . import fit
    kinship = None
    if args.kinship:
        kinship = _matrix_csv(args.kinship)
    result = fit(args.formula, _data(args.data), method=args.method, kinship=kinship)
    extra = {}
    if args.predict:
        from .specification import read_data
        new = read_data(args.predict)
        extra["predict"] = {"conditional": result.predict(new).tolist(),
                            "population": result.predict(new, re_form="~0").tolist()}
    if args.profile:
        extra["profile"] = result.conf_int(method="profile")
    if args.bootstrap:
        extra["bootstrap"] = result.bootstrap(args.bootstrap, seed=args.seed)
    if args.json:
        d = result.to_dict()
        if "predict" in extra:
            d["predict"] = extra["predict"]
        if "profile" in extra:
            d["profile_intervals"] = _interval_records(extra["profile"])
        if "bootstrap" in extra:
            b = extra["bootstrap"]
            d["bootstrap"] = {"nsim": b.nsim, "boundary_share": b.boundary_share, "failed": b.n_failed,
                              "intervals": _interval_records(b.conf_int())}
        print(json.dumps(d, indent=2, allow_nan=False))
        return 0
    print(result.summary())
    if "predict" in extra:
        import pandas as pd
        print("\nPredictions (conditional: with the random effects, a new level at b = 0; population: X beta):")
        print(pd.DataFrame(extra["predict"]).to_string(float_format=lambda v: f"{v:.6g}"))
    if "profile" in extra:
        print("\nProfile confidence intervals (lme4's confint; the ML profile, as lme4; the limits are the roots "
              "of zeta = -+z):")
        print(extra["profile"].to_string(float_format=lambda v: f"{v:.6g}"))
    if "bootstrap" in extra:
        b = extra["bootstrap"]
        print(f"\n{b}\nPercentile intervals:")
        print(b.conf_int().to_string(float_format=lambda v: f"{v:.6g}"))
    return 0


def _interval_records(frame) -> list[dict]:
    return [{"parameter": str(k), "lower": None if v.iloc[0] != v.iloc[0] else float(v.iloc[0]),
             "upper": None if v.iloc[1] != v.iloc[1] else float(v.iloc[1])} for k, v in frame.iterrows()]


def _anova(args) -> int:
    from . import anova, fit
    from .inference import anova_text
    from .progress import reporting
    data = _data(args.data)
    with reporting():
        fits = [fit(f, data, method=args.method) for f in args.formulas]
        table = anova(*fits, names=[f"m{k}" for k in range(len(fits))])
    if args.json:
        rows = [{"model": str(k), **{c: (None if v != v else float(v)) for c, v in r.items()}}
                for k, r in table.iterrows()]
        print(json.dumps({"notes": table.attrs["notes"], "models": table.attrs["heading"][1:], "table": rows},
                         indent=2, allow_nan=False))
    else:
        print(anova_text(table))
    return 0


def _matrix_csv(path: str):
    """A numeric matrix from a CSV file without a header."""
    import numpy as np

    from .errors import DataError
    try:
        return np.loadtxt(path, delimiter=",", ndmin=2)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the kinship matrix {path!r}: {str(exc).splitlines()[0]}") from None


def _verify(args) -> int:
    from . import derive
    from .verification import verify, verify_steps
    if args.steps:
        import stat

        from .errors import DataError
        if not stat.S_ISREG(os.stat(args.steps).st_mode):   # a FIFO would block until a writer comes
            raise DataError(f"{args.steps!r} is not a regular file (a pipe, socket or device is not read); save "
                            "the derivation to a text file, one expression a line")
        with open(args.steps, encoding="utf-8") as fh:
            lines = [line for line in fh.read(1_000_000).splitlines() if line.strip()]
        report = verify_steps(derive(args.formula, _data(args.data)), args.quantity, lines,
                              syntax="latex" if args.latex else None)
        print(json.dumps(report.to_dict(), indent=2) if args.json else str(report))
        return 0 if report.first_break is None else 1
    verdict = verify(derive(args.formula, _data(args.data)), args.quantity, args.expr,
                     syntax="latex" if args.latex else None)
    print(json.dumps(verdict.to_dict(), indent=2) if args.json else str(verdict))
    return 0 if verdict.equal else 1


def _demo(args) -> int:
    from . import derive, fit, paired_t_test
    data = datasets.load("toy")
    formula = datasets.formula("toy")
    print("The tutorial's toy data (Treat, Resp, Ind):\n")
    print(data.to_string(index=False))
    print(f"\nModel: {formula}")
    d = derive(formula, data)
    for e in d.equations:
        print(_pretty(e))
    for method in ("ML", "REML"):
        print("\n" + "=" * 78)
        print(fit(formula, data, method=method).summary())
    print("\n" + "=" * 78)
    print(paired_t_test(data))
    return 0


def _exercise(args) -> int:
    import nbformat

    from .exercises import exercise
    ex = exercise(args.seed, args.groups, args.sizes)
    ex.data.to_csv(f"{args.out}.csv", index=False)
    with open(f"{args.out}.tex", "w", encoding="utf-8") as fh:
        fh.write(ex.to_latex())
    nbformat.write(ex.to_notebook(), f"{args.out}.ipynb")
    print(f"wrote {args.out}.csv, {args.out}.tex, {args.out}.ipynb")
    return 0


_COMMANDS = {"exercise": _exercise, "derive": _derive, "fit": _fit, "anova": _anova, "verify": _verify, "demo": _demo}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
