"""`python -m helios_rt.benchmarking bench|profile ...`."""

import sys

from .commands import main

sys.exit(main())
