"""``python -m tclab``: the command line (and what torchrun runs: ``torchrun ... -m tclab sample ...``)."""

import sys

from .cli import main

sys.exit(main())
