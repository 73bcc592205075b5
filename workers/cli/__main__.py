"""``python -m workers.cli``: the ``statesweep`` command, e.g. under ``python -X importtime``."""

from workers.cli import main

main()
