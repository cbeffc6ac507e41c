"""msa, emsa, sqh and gradient on the reference problems and the control-set examples (docs/controls.md);
same as `python -m pmpsolve reproduce controls`."""
from pmpsolve.studies.controls import main

if __name__ == "__main__":
    main()
