"""Execute every notebook in notebooks/ top to bottom with nbclient; exit 1 if any cell fails.

    python notebooks/run.py            # run all, print each notebook's run time, leave the files alone
    python notebooks/run.py --write    # also save the outputs back into the .ipynb files
    python notebooks/run.py 03_maximum_likelihood.ipynb   # only some notebooks

The notebooks keep their outputs in the repository so that GitHub shows them rendered; ``--write`` is how a
developer refreshes those outputs after changing a notebook or the package. Each notebook runs in a fresh
``python3`` kernel with notebooks/ as its working directory, 600 s allowed per cell. The kernel gets
``LMM_SYMBOLIC_STATIC=1``: a kernel cannot tell whether a widget front end is attached, so the explorer
(``lmm_symbolic.plots.explorer``) draws its static figure, which is what a rendered page can show.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

HERE = Path(__file__).resolve().parent
TIMEOUT = 600
KERNEL = "python3"
STATIC_ENV = "LMM_SYMBOLIC_STATIC"  # lmm_symbolic.plots.STATIC_ENV (not imported: run.py needs no package)


def notebooks(names: list[str] | None = None) -> list[Path]:
    """The notebooks to run: all notebooks/*.ipynb in name order, or those named."""
    if not names:
        return sorted(HERE.glob("*.ipynb"))
    paths = []
    for name in names:
        path = Path(name)
        if not path.is_absolute() and not path.exists():
            path = HERE / path.name
        if not path.exists():
            raise FileNotFoundError(f"no notebook {name!r} in {HERE}")
        paths.append(path.resolve())
    return paths


def execute_notebook(path: Path, write: bool = False) -> tuple[nbformat.NotebookNode, float]:
    """Run one notebook in a fresh kernel (cwd notebooks/); return the executed notebook and its run time.

    Raises nbclient's CellExecutionError when a cell fails. Writes the outputs back only with ``write``.
    """
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=TIMEOUT, allow_errors=False,
                            resources={"metadata": {"path": str(HERE)}})
    previous = os.environ.get(STATIC_ENV)
    os.environ[STATIC_ENV] = "1"  # the kernel inherits this process's environment
    start = time.perf_counter()
    try:
        client.execute()
    finally:
        if previous is None:
            os.environ.pop(STATIC_ENV, None)
        else:
            os.environ[STATIC_ENV] = previous
    seconds = time.perf_counter() - start
    if write:
        nbformat.write(nb, path)
    return nb, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Execute the notebooks; exit 1 on any error.")
    parser.add_argument("names", nargs="*", help="notebooks to run (default: all in notebooks/)")
    parser.add_argument("--write", action="store_true", help="save the outputs into the .ipynb files")
    args = parser.parse_args(argv)
    try:
        paths = notebooks(args.names)
    except FileNotFoundError as exc:
        print(f"run.py: {exc}", file=sys.stderr)
        return 1
    if not paths:
        print(f"run.py: no notebooks in {HERE}", file=sys.stderr)
        return 1
    failed = []
    total = time.perf_counter()
    for path in paths:
        try:
            _, seconds = execute_notebook(path, write=args.write)
        except CellExecutionError as exc:
            failed.append(path.name)
            print(f"FAILED {path.name}:\n{exc}", file=sys.stderr, flush=True)
            continue
        except Exception as exc:  # noqa: BLE001 -- a kernel that dies or times out is a failure too
            failed.append(path.name)
            print(f"FAILED {path.name}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            continue
        print(f"{path.name:<36} {seconds:6.1f} s{'  (outputs written)' if args.write else ''}", flush=True)
    print(f"{len(paths) - len(failed)} of {len(paths)} notebooks ran in {time.perf_counter() - total:.1f} s")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
