"""`python -m pdjax.train`: see `pdjax.train.cli`."""

import sys

from pdjax.train.cli import main

sys.exit(main())
