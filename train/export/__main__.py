"""`python -m train.export CKPT`: see train.export.cli."""

import sys

from train.export.cli import main

sys.exit(main())
