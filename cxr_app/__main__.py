"""`python -m cxr_app predict FILES...`: see cxr_app/cli.py."""

import sys

from .cli import main

sys.exit(main())
