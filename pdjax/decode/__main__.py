"""`python -m pdjax.decode`: see `pdjax.decode.cli`."""

import sys

from pdjax.decode.cli import main

sys.exit(main())
