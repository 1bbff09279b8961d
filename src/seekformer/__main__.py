"""`python -m seekformer ...` (and `torchrun -m seekformer ...`): the `seekformer` command."""

import sys

from .cli import main

sys.exit(main())
