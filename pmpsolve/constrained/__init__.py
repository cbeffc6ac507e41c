"""Constraints, a free final time and static parameters, by an augmented-Lagrangian loop around
the Solver (docs/theory.md): ``transcription`` rewrites the problem at fixed multipliers as an
ordinary ControlProblem, ``outer`` updates the multipliers, penalties, T and p between solves."""
