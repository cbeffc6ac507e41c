"""Solve the reference problems (docs/guide.md section 5, docs/theory.md) and print the table; same as
`python -m pmpsolve reproduce reference`."""
from pmpsolve.studies.reference import main

if __name__ == "__main__":
    main()
