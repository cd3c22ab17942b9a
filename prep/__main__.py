"""`python -m prep` is the `prep` command."""

import sys

from prep.cli import main

sys.exit(main())
