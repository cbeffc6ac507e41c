"""Command line: ``python -m pmpsolve reproduce [STUDY] [options]``.

Studies: ``sine`` (the paper's Fig. 1a/1b: E-MSA against SGD, Adagrad and Adam
on the sine approximation; the main job) and ``reference`` (the reference
problems of docs/theory.md, solved and checked) and ``controls`` (msa,
emsa, sqh and gradient compared on those and on the control-set examples;
docs/controls.md). ``python -m pmpsolve
reproduce`` with no study runs the main job; ``... reproduce sine --help``
lists a study's options.
"""
from __future__ import annotations

import sys

STUDIES = {
    "sine": "pmpsolve.studies.sine",
    "reference": "pmpsolve.studies.reference",
    "controls": "pmpsolve.studies.controls",
}
MAIN_STUDY = "sine"


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nstudies: " + ", ".join(STUDIES) + f" (default: {MAIN_STUDY})")
        return
    command, rest = argv[0], argv[1:]
    if command != "reproduce":
        raise SystemExit(f"unknown command {command!r}; usage: python -m pmpsolve reproduce [{'|'.join(STUDIES)}]")
    study = MAIN_STUDY
    if rest and not rest[0].startswith("-"):
        study, rest = rest[0], rest[1:]
    if study not in STUDIES:
        raise SystemExit(f"unknown study {study!r}; choose one of {sorted(STUDIES)}")
    import importlib

    importlib.import_module(STUDIES[study]).main(rest)


if __name__ == "__main__":
    main()
