"""`python -m helios_rt ...`: the `helios-rt` command, the form `torchrun -m helios_rt` launches."""

import sys

from .cli import main
from .parallel.launch import finish

if __name__ == "__main__":
    code = main()
    if code == 0:
        finish()
    sys.exit(code)
