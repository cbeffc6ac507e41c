"""Solve the reference problems of DESIGN.md section 5 and print the table; same as
`python -m pmpsolve reproduce reference`."""
from pmpsolve.studies.reference import main

if __name__ == "__main__":
    main()
