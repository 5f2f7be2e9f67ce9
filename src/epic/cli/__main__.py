"""`python -m epic.cli`: the `epic` command."""

import sys

from epic.cli import main

sys.exit(main())
