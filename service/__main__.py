"""``python -m service``: the ``kvtier`` command line (see ``service/cli.py``)."""

from service.cli import main

main()
