"""``python -m UniverSegResearch`` runs the developer tools' command line."""

import sys

from .cli import main

sys.exit(main())
