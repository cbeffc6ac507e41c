"""Every ```python block of README.md and docs/*.md runs as written.

The blocks of one page share one namespace, in order (later blocks build on earlier
ones, as a reader running the page would), but every page starts from an empty
namespace and runs in its own empty temporary directory: no page depends on another
page, on another test, or on files already present (results/, figures).
"""
import importlib.util
import os
import pathlib
import re

import matplotlib
import pytest

from pmpsolve.update.rules import RULES

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


#: What the repository says is what it is: the tracker's issue numbers and the phrases of a work log
#: ("this session", "the last run", a date of work) belong in CHANGELOG.md only, where history is told
#: by version. Written so that this file does not match itself.
WORK_LOG = re.compile("|".join([
    r"\bissues?[ _-]?#?[0-9]+", r"(?<![\w&/])#[0-9]+\b", r"\b(?:this|last|previous|earlier|the) session\b",
    r"\b(?:the|this|in the|an|our) last run\b", r"\bearlier (?:code|measurements?|runs? of|session)\b",
    r"\bearlier pair of runs\b", r"\bre-measured (?:at the end|after)\b",
    r"\bduring the work\b", r"\b(?:run |measured )?on main\b", r"\b20[0-9]{2}-[01][0-9]-[0-3][0-9]\b",
    r"\b(?:the|this) issue(?:'s)?\b",
]), flags=re.I)
HISTORY_FREE = [ROOT / "README.md", ROOT / "Makefile", *ROOT.glob("docs/**/*.md"), *ROOT.glob("pmpsolve/**/*.py"),
                *ROOT.glob("problems/*.py"), *ROOT.glob("scripts/*.py"), *ROOT.glob("scripts/*.md"),
                *ROOT.glob("tests/*.py")]


def test_the_repository_describes_itself_as_it_is():
    """No issue numbers and no work-log phrasing outside CHANGELOG.md (comments and docstrings too)."""
    offenders = []
    for path in HISTORY_FREE:
        if path == pathlib.Path(__file__).resolve():
            continue  # the patterns above
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if WORK_LOG.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not offenders, "\n".join(offenders)


def test_the_benchmark_report_is_generated_from_the_json():
    """docs/benchmarks.md is what scripts/report.py makes of docs/figures/*.json and its template."""
    spec = importlib.util.spec_from_file_location("report", ROOT / "scripts" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    assert report.main(["--check"]) == 0, "docs/benchmarks.md is out of date: run `python scripts/report.py`"


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
