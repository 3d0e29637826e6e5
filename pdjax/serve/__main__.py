"""`python -m pdjax.serve`."""

import sys

from pdjax.serve.cli import main

sys.exit(main())
