"""MkDocs hooks of the documentation site (mkdocs.yml): pages made from the repository's own files.

- ``index.md`` and ``CHANGELOG.md``: README.md and CHANGELOG.md, with their ``docs/...`` links
  rewritten to the site's pages, so the home page is the README and not a second copy of it; the
  docs/ pages' ``../README.md`` and ``../CHANGELOG.md`` links lead to them.
- ``reference/pmpsolve.md`` and ``reference/nn.md``: the API reference, one mkdocstrings entry per
  name of ``pmpsolve.__all__`` and ``pmpsolve.nn.__all__``, read at build time. ``GROUPS`` only
  orders the names into sections: a public name that no group lists still gets an entry, under
  "Other public names", and a listed name that is no longer public is left out. A new public name
  therefore cannot be missing from the reference (tests/test_site.py checks the built pages).
"""
from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: (page, module, title, introduction, [(section, [names])]) of the API reference.
GROUPS = [
    ("reference/pmpsolve.md", "pmpsolve", "API reference: pmpsolve",
     "The public names of `pmpsolve` (`pmpsolve.__all__`), usually imported as "
     "`import pmpsolve as pmp`. Shapes are written `[N, K, n]`: N mesh intervals, K samples, "
     "n states, m controls.",
     [("Problems, control sets and control costs",
       ["ControlProblem", "ControlSet", "Reals", "Box", "Finite", "Ball", "UserSet",
        "ControlPenalty", "L1", "L0"]),
      ("Solving", ["solve", "Solver", "SolverState"]),
      ("Method and option objects",
       ["Method", "EMSA", "MSA", "SQH", "Gradient", "DDP", "Rule", "ODE", "Maximiser", "Stop", "RelaxAndRound"]),
      ("Results", ["Solution", "IterationRecord"]),
      ("Costs, gradients, optimality and rounding",
       ["cost", "cost_gradient", "optimality_of", "sum_up_rounding"]),
      ("Extending: update rules and maximisers",
       ["UpdateRule", "register_rule", "RULES", "MaximisationData"]),
      ("Errors", ["SolveError", "NonFiniteError", "DivergenceError", "SweepBudgetError", "IterationMemoryError"]),
      ("Networks", ["nn"])]),
    ("reference/nn.md", "pmpsolve.nn", "API reference: pmpsolve.nn",
     "Training `torch.nn.Sequential` networks by the maximum principle (`pmpsolve.nn.__all__`); "
     "the guide is [Networks](../networks.md).",
     [("Optimizers", ["Optimizer", "EMSA", "MSA", "SQH", "OCNOpt"]),
      ("Layers", ["Residual"]),
      ("Discrete and sparse weights", ["DiscreteRule", "StraightThrough", "MagnitudePruning"])]),
]


def public_names(module: str) -> list:
    # this checkout's package (mkdocstrings reads its source: paths [.]), even where another copy is
    # installed; here and not at import: MkDocs restores sys.path after loading a hook
    if sys.path[0] != str(ROOT):
        sys.path.insert(0, str(ROOT))
    return list(importlib.import_module(module).__all__)


def reference_page(module: str, title: str, intro: str, sections) -> str:
    names = public_names(module)
    grouped = [(section, [n for n in listed if n in names]) for section, listed in sections]
    seen = {n for _, listed in grouped for n in listed}
    rest = [n for n in names if n not in seen]
    if rest:
        grouped.append(("Other public names", rest))
    lines = [f"# {title}", "", intro, ""]
    for section, listed in grouped:
        if not listed:
            continue
        lines += [f"## {section}", ""]
        for name in listed:
            obj = getattr(importlib.import_module(module), name)
            lines.append(f"::: {module}.{name}")
            if type(obj).__name__ == "module":  # a subpackage: its docstring here, its names on its own page
                lines += ["    options:", "      members: false", "",
                          f"The names of `{module}.{name}` are on [their own page]({name}.md).", ""]
            lines.append("")
    return "\n".join(lines)


#: Top-level files the site serves as pages: (file, page). The docs/ pages link them as ../file.
TOP_LEVEL_PAGES = [("README.md", "index.md"), ("CHANGELOG.md", "CHANGELOG.md")]


def top_level_page(name: str) -> str:
    text = (ROOT / name).read_text()
    # a top-level file links docs/x.md from the top level; the site serves docs/ itself
    return re.sub(r"\]\(docs/", "](", text)


def on_files(files, config):
    from mkdocs.structure.files import File

    for name, page in TOP_LEVEL_PAGES:
        if (ROOT / name).is_file():
            files.append(File.generated(config, page, content=top_level_page(name)))
    for page, module, title, intro, sections in GROUPS:
        files.append(File.generated(config, page, content=reference_page(module, title, intro, sections)))
    return files


def on_page_markdown(markdown, page, config, files):
    """A docs/ page's link to ../README.md or ../CHANGELOG.md goes to the site's page of that file
    (any other link out of docs/ stays, and the strict build reports it)."""
    depth = page.file.src_uri.count("/")
    for name, target in TOP_LEVEL_PAGES:
        markdown = markdown.replace(f"](../{'../' * depth}{name}", f"]({'../' * depth}{target}")
    return markdown
