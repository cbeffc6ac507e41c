"""The documentation site (mkdocs.yml): the API reference, the docstring examples and the gallery.

- Every name of ``pmpsolve.__all__`` and ``pmpsolve.nn.__all__`` has an entry in the reference
  pages and a runnable example in its docstring (the messages name the missing ones).
- The strict build passes (``make docs``): no broken link, no page outside the navigation, no
  reference to a missing docstring; the built reference has an anchor for every public name.
- Every gallery example runs in its ``--quick`` form, and every committed gallery page shows the
  current code of its script and figures that exist.
"""
import ast
import doctest
import importlib.util
import os
import pathlib
import subprocess
import sys
import types

import pytest

import pmpsolve as pmp

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = {"pmpsolve": pmp, "pmpsolve.nn": pmp.nn}
#: Docstring examples the doctest below leaves out, with the reason; they run elsewhere.
SLOW_EXAMPLES = {
    "pmpsolve.nn.EMSA": "trains a network for two minutes; tests/test_nn.py and docs/networks.md cover it",
}


def load(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def public_names():
    return [(module, name) for module, obj in MODULES.items() for name in obj.__all__]


def test_the_reference_pages_have_an_entry_for_every_public_name():
    hooks = load(ROOT / "scripts" / "mkdocs_hooks.py")
    pages = "\n".join(hooks.reference_page(module, title, intro, sections)
                      for _, module, title, intro, sections in hooks.GROUPS)
    missing = [f"{module}.{name}" for module, name in public_names() if f"::: {module}.{name}\n" not in pages]
    assert not missing, f"public names without an entry in the API reference (scripts/mkdocs_hooks.py): {missing}"
    documented = {module for _, module, *_ in hooks.GROUPS}
    assert documented == set(MODULES), "a public module without its reference page"


def docstring(module: str, name: str) -> str:
    """The docstring the reference shows: the object's own, or for a data attribute (a dict such as
    RULES) the string literal after its assignment in the source, as griffe reads it."""
    obj = getattr(MODULES[module], name)
    if isinstance(obj, (type, types.FunctionType, types.ModuleType)):
        return obj.__doc__ or ""
    for path in (ROOT / "pmpsolve").rglob("*.py"):
        body = ast.parse(path.read_text()).body
        for statement, following in zip(body, body[1:]):
            targets = statement.targets if isinstance(statement, ast.Assign) else [getattr(statement, "target", None)]
            if (any(isinstance(t, ast.Name) and t.id == name for t in targets) and isinstance(following, ast.Expr)
                    and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
                return following.value.value
    return ""


def test_every_public_name_has_an_example_in_its_docstring():
    missing = [f"{module}.{name}" for module, name in public_names() if ">>>" not in docstring(module, name)]
    assert not missing, (f"public names whose docstring has no example (an 'Example:' section of "
                         f"'>>>' lines, shown in the API reference): {missing}")


@pytest.mark.parametrize("module, name", public_names(), ids=lambda v: v if isinstance(v, str) else "")
def test_docstring_examples_run(module, name):
    qualified = f"{module}.{name}"
    if qualified in SLOW_EXAMPLES:
        pytest.skip(SLOW_EXAMPLES[qualified])
    obj = getattr(MODULES[module], name)
    globs = dict(vars(MODULES[module]))
    if isinstance(obj, (type, types.FunctionType, types.ModuleType)):
        tests = doctest.DocTestFinder(recurse=False).find(obj, qualified, globs=globs)
    else:  # a data attribute (RULES): the docstring in the source
        tests = [doctest.DocTestParser().get_doctest(docstring(module, name), globs, qualified, None, 0)]
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    rules = dict(pmp.RULES)  # an example may register a rule of its own (UpdateRule); other tests must not see it
    try:
        for test in tests:
            runner.run(test, out=lambda text: print(text, end=""))
    finally:
        pmp.RULES.clear()
        pmp.RULES.update(rules)
    assert runner.failures == 0, f"{qualified}: {runner.failures} failing example(s), printed above"


def test_strict_build(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra is not installed (make test and make docs install it)")
    pytest.importorskip("mkdocstrings", reason="the docs extra is not installed (make test and make docs install it)")
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    html = {module: (site / "reference" / ("pmpsolve" if module == "pmpsolve" else "nn") / "index.html").read_text()
            for module in MODULES}
    missing = [f"{module}.{name}" for module, name in public_names() if f'id="{module}.{name}"' not in html[module]]
    assert not missing, f"public names without an entry in the built reference: {missing}"
    gallery = load(ROOT / "scripts" / "gallery.py")
    for name in gallery.EXAMPLES:
        page = (site / "gallery" / name / "index.html").read_text()
        assert '<img alt="' in page, name
    assert (site / "index.html").read_text().count("guide/") >= 1  # the README's links, rewritten


def test_gallery_examples_run_quick(tmp_path):
    gallery = load(ROOT / "scripts" / "gallery.py")
    scripts = sorted(p.stem for p in (ROOT / "docs" / "gallery").glob("*.py"))
    assert sorted(gallery.EXAMPLES) == scripts, "every docs/gallery/*.py is an example of scripts/gallery.py"
    gallery.main(["--quick", "--out", str(tmp_path)])
    for name in gallery.EXAMPLES:
        page = (tmp_path / f"{name}.md").read_text()
        figures = [line[line.index("(") + 1:-1] for line in page.splitlines() if line.startswith("![")]
        assert figures and all((tmp_path / f).stat().st_size > 10_000 for f in figures), name
        assert "**Result.** " in page, name
    assert (tmp_path / "index.md").is_file()


def test_committed_gallery_pages_show_their_current_code_and_figures():
    gallery = load(ROOT / "scripts" / "gallery.py")
    folder = ROOT / "docs" / "gallery"
    nav = (ROOT / "mkdocs.yml").read_text()
    stale = []
    for name in gallery.EXAMPLES:
        page = (folder / f"{name}.md").read_text()
        code = (folder / f"{name}.py").read_text().rstrip("\n")
        if f"```python\n{code}\n```" not in page:
            stale.append(name)
        for line in page.splitlines():
            if line.startswith("!["):
                assert (folder / line[line.index("(") + 1:-1]).is_file(), (name, line)
        assert f"gallery/{name}.md" in nav, f"docs/gallery/{name}.md is not in the navigation of mkdocs.yml"
        assert f"({name}.md)" in (folder / "index.md").read_text(), name
    assert not stale, f"gallery pages older than their script (run `python scripts/gallery.py {' '.join(stale)}`)"
