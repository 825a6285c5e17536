"""How a benchmark ends on what the user can fix (no dataset, a damaged checkpoint): the message alone on
stderr after "error:", and exit status 2, as `msdnet` does; a traceback would bury the
fix (where to put CIFAR-10, how to restore the weights) under library frames."""
import sys
from collections.abc import Callable

from helpers import checkpoint, data


def run(main: Callable[[], object]) -> None:
    try:
        main()
    except (data.DataNotFoundError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
