"""``python -m service``: the ``kvtier`` command line (see ``service/cli.py``)."""

from kvtier.service.cli import main

main()
