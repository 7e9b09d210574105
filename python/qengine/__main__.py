"""`python -m qengine` runs the qengine command."""

import sys

from .cli import main

sys.exit(main())
