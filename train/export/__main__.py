"""`python -m train.export CKPT`: see train.export."""

import sys

from train.export.checkpoint import main

sys.exit(main())
