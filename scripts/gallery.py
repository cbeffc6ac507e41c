"""The gallery of worked problems (docs/gallery/): run every example and write its page and figures.

Each example is a script docs/gallery/<name>.py with a module docstring (its first line is the
page's title, the rest its introduction) and a function ``main(out, quick=False)`` that solves the
problem, saves its figures as PNG files in the folder ``out`` and returns ``(result, figures)``:
one sentence with the optimum found against the published value, and the names of the figures.
This script writes the page docs/gallery/<name>.md from them: the introduction, the figures, the
sentence and the script itself, so every figure on a page is made by the code shown on it.

    python scripts/gallery.py                      # every example, full size (a few minutes)
    python scripts/gallery.py lqr catalyst         # some of them
    python scripts/gallery.py --quick --out DIR    # small meshes, pages and figures into DIR
                                                   # (the test suite; docs/gallery/ is left alone)
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's pmpsolve and problems, not another installed copy
GALLERY = ROOT / "docs" / "gallery"
#: The examples in the order of the gallery's index page.
EXAMPLES = ["lqr", "catalyst", "vanderpol", "rayleigh", "double_integrator", "sine", "moons"]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"gallery_{name}", GALLERY / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def page(name: str, module, result: str, figures, seconds: float, quick: bool) -> str:
    title, _, intro = inspect.getdoc(module).partition("\n")
    code = (GALLERY / f"{name}.py").read_text()
    lines = [f"# {title}", "", intro.strip(), ""]
    lines += [f"![{Path(f).stem}]({f})" for f in figures]
    lines += ["", f"**Result.** {result}", "",
              "## The code", "",
              f"`python docs/gallery/{name}.py` runs it and writes the figure{'s' if len(figures) > 1 else ''} "
              f"beside it; `make gallery` regenerates every page of the gallery "
              f"({seconds:.0f} s for this one on a 2-core CPU{', --quick' if quick else ''}).", "",
              "```python", code.rstrip("\n"), "```", ""]
    return "\n".join(lines)


def index(entries) -> str:
    lines = ["# Gallery", "",
             "Worked problems, one page each: the code, the figures it makes (the control, the states and "
             "the co-states against time) and the optimum it finds against the published value. "
             "Every page is written by `make gallery` (`python scripts/gallery.py`) from the script "
             "beside it in docs/gallery/.", "",
             "| problem | result |", "| --- | --- |"]
    for name, title, result in entries:
        lines.append(f"| [{title}]({name}.md) | {result} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"examples to run (default: all of {', '.join(EXAMPLES)})")
    parser.add_argument("--quick", action="store_true", help="small meshes and few iterations (a smoke test)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the pages and figures (default docs/gallery; required with --quick)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in EXAMPLES]
    if unknown:
        parser.error(f"unknown example(s) {unknown}; the examples are {EXAMPLES}")
    if args.quick and args.out is None:
        parser.error("--quick needs --out DIR: its small-mesh figures must not replace the gallery's")
    out = args.out or GALLERY
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib.pyplot as plt

    entries = {}
    for name in args.names or EXAMPLES:
        module = load(name)
        start = time.perf_counter()
        result, figures = module.main(out, quick=args.quick)
        seconds = time.perf_counter() - start
        plt.close("all")
        missing = [f for f in figures if not (out / f).is_file()]
        if missing:
            raise RuntimeError(f"docs/gallery/{name}.py returned figures it did not write: {missing}")
        (out / f"{name}.md").write_text(page(name, module, result, figures, seconds, args.quick))
        entries[name] = (inspect.getdoc(module).partition("\n")[0], result)
        print(f"{name:18s} {seconds:6.1f} s  {result}", flush=True)
    # the index lists every example; one not run now keeps the result its own page shows
    rows = []
    for name in EXAMPLES:
        if name in entries:
            rows.append((name, *entries[name]))
        elif (out / f"{name}.md").is_file():
            text = (out / f"{name}.md").read_text()
            result = text.split("**Result.** ", 1)[1].split("\n", 1)[0] if "**Result.** " in text else ""
            rows.append((name, text.split("\n", 1)[0].lstrip("# "), result))
    (out / "index.md").write_text(index(rows))


if __name__ == "__main__":
    sys.exit(main())
