"""`python -m kvshrink` (and `torchrun -m kvshrink generate ...`): the command line."""

import sys

from .cli import main

sys.exit(main())
