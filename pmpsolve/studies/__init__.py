"""Reproduction studies and tables (each writes JSON and figures under results/ and prints a table).

The command line reaches them as ``python -m pmpsolve reproduce <study>``; the
thin wrappers in scripts/ call the same functions.
"""
