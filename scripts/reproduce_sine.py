"""Reproduce the paper's sine-approximation study (Fig. 1a/1b); same as `python -m pmpsolve reproduce sine`.

    python scripts/reproduce_sine.py [--out DIR] [--iterations N] [--seed S] [--device D] [--rho R]
                                     [--quick | --full] [--tune] [--resume]

results.json is rewritten after every run; after Ctrl-C the same command with --resume continues.
"""
from pmpsolve.studies.sine import main

if __name__ == "__main__":
    main()
