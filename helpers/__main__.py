"""``python -m helpers``: the same as the ``msdnet`` command (helpers.cli)."""
import sys

from .cli import main

sys.exit(main())
