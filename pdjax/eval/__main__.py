"""`python -m pdjax.eval`: see `pdjax.eval.cli`."""

from pdjax.eval.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
