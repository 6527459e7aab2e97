"""`python -m crossbow_jax ...`: the same as the `crossbow-jax` command."""

import sys

from crossbow_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
