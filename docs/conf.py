"""Sphinx configuration of the course site: the executed notebooks, the tutorial's outline, the API.

Build (from the repository root): ``sphinx-build -b html docs docs/_build/html``.
The notebooks are rendered from their stored outputs (never executed here), and MathJax is served from
the site itself (the ``sphinx-mathjax-offline`` package ships it), so the pages work without a network.
"""
from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # document this checkout's package, not an installed copy


def _copy_notebooks() -> None:
    """Mirror ../notebooks/*.ipynb into docs/notebooks/ (git-ignored), keeping mtimes for incremental builds."""
    target = DOCS / "notebooks"
    target.mkdir(exist_ok=True)
    sources = {p.name: p for p in sorted((ROOT / "notebooks").glob("*.ipynb"))}
    for stale in target.glob("*.ipynb"):
        if stale.name not in sources:
            stale.unlink()
    for name, src in sources.items():
        dst = target / name
        if not dst.exists() or dst.stat().st_mtime != src.stat().st_mtime or dst.stat().st_size != src.stat().st_size:
            shutil.copy2(src, dst)


_copy_notebooks()

import lmm_symbolic  # noqa: E402

project = "lmm_symbolic"
html_title = "lmm_symbolic: the course"
author = "lmm_symbolic developers"
copyright = "lmm_symbolic developers"
release = version = lmm_symbolic.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax 3 copied into _static/mathjax: no CDN at read time
]

exclude_patterns = ["_build", "**.ipynb_checkpoints"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}

# notebooks: the outputs committed in the .ipynb files, never re-executed at build time
nb_execution_mode = "off"
nb_output_stderr = "show"
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

# MathJax 3, local (sphinx-mathjax-offline sets mathjax_path to mathjax/tex-chtml.js)
mathjax3_config = {
    "tex": {"inlineMath": [["\\(", "\\)"]], "displayMath": [["\\[", "\\]"]]},
}

# every cross-reference resolves (CI builds with -W): the package's own names must be documented here;
# numpy, pandas, sympy, scipy and the standard library are named in signatures without links (no
# intersphinx: the build is offline), and private names are the code's, not the reader's
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(numpy|np|pandas|pd|sympy|sp|scipy|os|collections|logging|typing|pathlib|dask)(\..*)?"),
    (r"py:.*", r"(.*\.)?_[A-Za-z].*"),
]

highlight_language = "none"  # literal blocks (the docstrings' formulas) are not code
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# a signature longer than this is written one parameter per line (fit, the deviance classes), not wrapped
python_maximum_signature_line_length = 88

_LITERAL = re.compile(r"(``.+?``|:[a-z:]+:`[^`]+`)")
_ITEM = re.compile(r"\s*([*-]|\d+\.)\s")
_DIRECTIVE = re.compile(r"\s*\.\. [a-z-]+::")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _escape_bars(line: str) -> str:
    """|Sigma| is a determinant, not a reStructuredText substitution: escape bars outside literals and roles."""
    parts = _LITERAL.split(line)
    return "".join(p if i % 2 else p.replace("|", "\\|") for i, p in enumerate(parts))


def plain_maths_docstring(app, what, name, obj, options, lines) -> None:
    """Read the package's plain-text docstrings as they are meant (autodoc-process-docstring).

    The docstrings write maths in plain text (``|Sigma| = sigma^(2m) ...``), with formulas on indented
    lines under a sentence. reStructuredText would read ``|x|`` as a substitution and the indented lines as
    an error; here bars are escaped, an indented run under a paragraph becomes a literal block (aligned, as
    in the source), and a list that starts or ends without a blank line gets one. Maths written as
    reStructuredText (``:math:`` roles, ``.. math::`` blocks) is left as written and typeset by MathJax.
    """
    out: list[str] = []
    in_run = False
    base = 0
    item = None  # indentation of the list being read
    directive = None  # indentation of a ``.. math::`` (or other directive) whose body is read as written
    for line in lines:
        if directive is not None:
            if not line.strip() or _indent(line) > directive:
                out.append(line)
                continue
            directive = None
        if _DIRECTIVE.match(line):
            directive = _indent(line)
            if out and out[-1].strip():
                out.append("")
            out.append(line)
            continue
        if item is not None and line.strip() and not _ITEM.match(line) and _indent(line) <= item:
            item = None
            if out and out[-1].strip():
                out.append("")      # a list ends and the paragraph goes on
        if in_run and line.strip() and _indent(line) <= base:
            in_run = False
            out.append("")
        prev = out[-1] if out else ""
        if not in_run and line.strip() and not prev.strip():
            last = next((i for i in range(len(out) - 1, -1, -1) if out[i].strip()), None)
            if (last is not None and _indent(line) > _indent(out[last]) and out[last].rstrip().endswith(":")
                    and not out[last].rstrip().endswith("::") and not _ITEM.match(out[last])):
                in_run, base = True, _indent(out[last])   # an indented formula block after "...:"
                out[last] = out[last].rstrip() + ":"
        if not in_run and line.strip() and prev.strip():
            if _ITEM.match(line) and not _ITEM.match(prev) and _indent(line) == _indent(prev):
                out.append("")          # a list directly under a sentence
            elif _indent(line) > _indent(prev) and not _ITEM.match(prev) and not prev.rstrip().endswith("::"):
                in_run, base = True, _indent(prev)
                out[-1] = prev + ("::" if prev.rstrip().endswith(":") else " ::")
                out.append("")
        if not in_run and _ITEM.match(line):
            item = _indent(line)
        out.append(line if in_run else _escape_bars(line))
    lines[:] = out


def factory_defaults(app, what, name, obj, options, signature, return_annotation):
    """A dataclass field with ``default_factory`` shows as ``= <factory>``, which the Python domain cannot
    parse, so the whole signature fell back to raw text (``~numpy.ndarray``, no line per parameter): write
    it ``= ...`` instead (autodoc-process-signature)."""
    if signature and "<factory>" in signature:
        return signature.replace("<factory>", "..."), return_annotation
    return None


def package_name_by_suffix(app, env, node, contnode):
    """A docstring may name a class of another stage by its short name (``:class:`BlockStatistics``` in
    compilation, ``:meth:`InterceptDeviance.hessian``` in optimisation): when exactly one documented
    object of the package ends with that name, link to it (missing-reference); otherwise the reference
    stays unresolved, which -W and the site check report."""
    if node.get("refdomain") != "py":
        return None
    from sphinx.util.nodes import make_refnode
    target = node["reftarget"].lstrip("~.")
    objects = env.get_domain("py").objects
    matches = [name for name in objects if name.startswith("lmm_symbolic.") and name.endswith("." + target)]
    if len(matches) != 1:
        return None
    entry = objects[matches[0]]
    return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, matches[0])


def setup(app):
    app.connect("autodoc-process-docstring", plain_maths_docstring)
    app.connect("missing-reference", package_name_by_suffix)
    app.connect("autodoc-process-signature", factory_defaults)

html_theme = "sphinx_book_theme"
html_static_path = ["_static"]
html_css_files = ["course.css"]
html_theme_options = {
    "show_toc_level": 2,
    "home_page_in_toc": True,
    "use_download_button": False,
    "use_fullscreen_button": False,
    "use_repository_button": False,
}
html_last_updated_fmt = None
