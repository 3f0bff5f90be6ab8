"""``python -m imtext.cli``: the console script without its launcher (torchrun runs it so)."""

import sys

from imtext.cli import main

sys.exit(main())
