"""``python -m drdo ...`` runs the ``drdo`` command line (see drdo/cli.py)."""
import sys

from drdo.cli import main

sys.exit(main())
