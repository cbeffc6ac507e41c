"""A griffe extension of the documentation site (mkdocs.yml): ``Example:`` sections as examples.

The docstrings of pmpsolve head their examples ``Example:`` or ``Example: one sentence.``; the
Google-style parser knows only ``Examples:`` (it renders ``Example:`` as an admonition whose
``>>>`` lines become Markdown quotes). This rewrites the heading before parsing, leaving the
source alone: ``Example: sentence.`` becomes the sentence as text followed by ``Examples:``.
"""
from __future__ import annotations

import re

import griffe

_HEADING = re.compile(r"^(?P<indent>[ \t]*)Example:(?P<rest>.*)$", re.M)


def _rewrite(text: str) -> str:
    def heading(match):
        indent, rest = match["indent"], match["rest"].strip()
        return f"{indent}{rest[:1].upper()}{rest[1:]}\n\n{indent}Examples:" if rest else f"{indent}Examples:"

    return _HEADING.sub(heading, text)


class ExampleSections(griffe.Extension):
    def on_package(self, *, pkg, **kwargs) -> None:
        stack = [pkg]
        while stack:
            obj = stack.pop()
            if obj.is_alias:
                continue
            if obj.docstring is not None and "Example:" in obj.docstring.value:
                obj.docstring.value = _rewrite(obj.docstring.value)
            stack.extend(obj.members.values())
