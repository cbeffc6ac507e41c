"""Command line: ``python -m pmpsolve reproduce [STUDY] [options]``.

Studies: ``sine`` (the paper's Fig. 1a/1b: E-MSA against SGD, Adagrad and Adam
on the sine approximation; the main job, docs/sine.md), ``reference`` (the
reference problems, solved and re-checked by an independent integrator;
docs/guide.md section 5), ``controls`` (msa, emsa, sqh and gradient compared
on those and on the control-set examples; docs/controls.md) and ``cnn`` (the
paper's Figs. 2-4: E-MSA against SGD, Adagrad and Adam training a residual CNN
on real handwritten digits; docs/networks.md) and ``discrete`` (binary,
ternary and L0-sparse weights by MSA / SQH against straight-through and
magnitude pruning; docs/discrete.md). ``python -m pmpsolve
reproduce`` with no study runs the main job; ``... reproduce sine --help``
lists a study's options.

Every study writes OUT/results.json after each run; stopped by Ctrl-C, it
prints the command that continues it (the same one with ``--resume``).
The method is described in docs/theory.md.
"""
from __future__ import annotations

import argparse
import sys

STUDIES = {
    "sine": "pmpsolve.studies.sine",
    "reference": "pmpsolve.studies.reference",
    "controls": "pmpsolve.studies.controls",
    "cnn": "pmpsolve.studies.cnn",
    "discrete": "pmpsolve.studies.discrete",
}
MAIN_STUDY = "sine"


def _parser() -> argparse.ArgumentParser:
    """For the help text and the errors only: the study's own parser reads its options."""
    parser = argparse.ArgumentParser(
        prog="python -m pmpsolve", description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="python -m pmpsolve reproduce [STUDY] [options]",
        epilog=f"studies: {', '.join(STUDIES)} (default: {MAIN_STUDY})")
    parser.add_argument("command", choices=["reproduce"], help="the only command")
    parser.add_argument("study", nargs="?", choices=list(STUDIES), default=MAIN_STUDY,
                        help=f"which study (default: {MAIN_STUDY})")
    return parser


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv or argv[0] in ("-h", "--help") or argv[:2] in (["reproduce", "-h"], ["reproduce", "--help"]):
        parser.print_help()
        return
    command, rest = argv[0], argv[1:]
    if command != "reproduce":
        parser.error(f"argument command: invalid choice: {command!r} (choose from 'reproduce')")
    study = MAIN_STUDY
    if rest and not rest[0].startswith("-"):
        study, rest = rest[0], rest[1:]
    if study not in STUDIES:
        parser.error(f"argument study: invalid choice: {study!r} (choose from {', '.join(map(repr, STUDIES))})")
    import importlib

    try:
        importlib.import_module(STUDIES[study]).main(rest)
    except KeyboardInterrupt:  # outside a study's runs (loading, drawing figures): the complete runs are saved
        from pmpsolve.studies.cli import resume_command

        print(f"\ninterrupted; continue with: {resume_command(study, rest)}", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
