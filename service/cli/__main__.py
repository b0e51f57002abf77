"""`python -m strokes.service.cli`: the `strokes` command."""

import sys

from strokes.service.cli.main import main

sys.exit(main())
