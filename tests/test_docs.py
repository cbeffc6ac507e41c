"""Every ```python block of README.md and docs/*.md runs as written.

The blocks of one page share one namespace, in order (later blocks build on earlier
ones, as a reader running the page would), but every page starts from an empty
namespace and runs in its own empty temporary directory: no page depends on another
page, on another test, or on files already present (results/, figures).
"""
import os
import pathlib
import re

import matplotlib
import pytest

from pmpsolve.rules import RULES

matplotlib.use("Agg")
ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_examples_run(page, tmp_path):
    text = page.read_text()
    namespace = {"__name__": "__main__"}
    assert not any(tmp_path.iterdir())
    cwd = os.getcwd()
    os.chdir(tmp_path)
    rules = dict(RULES)  # a page may register its own rule (docs/architecture.md); other tests must not see it
    try:
        for match in re.finditer(r"```python\n(.*?)```", text, flags=re.S):
            # Pad with blank lines so that a traceback names the line of the page itself.
            first_line = text.count("\n", 0, match.start(1))
            exec(compile("\n" * first_line + match.group(1), str(page), "exec"), namespace)
    finally:
        os.chdir(cwd)
        RULES.clear()
        RULES.update(rules)
        import matplotlib.pyplot as plt

        plt.close("all")


def test_the_repository_stands_alone():
    """Users get the repository only: no page, docstring or help text may send them to files
    outside it (the design notes and papers the developers keep beside it)."""
    offenders = []
    for path in [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("pmpsolve/**/*.py"),
                 *ROOT.glob("problems/*.py"), *ROOT.glob("scripts/*.py")]:
        text = path.read_text()
        if "DESIGN.md" in text or "../shared" in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders
