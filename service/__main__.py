"""``python -m kvtier.service``: the ``kvtier`` command line (see ``service/apps/cli.py``)."""

from kvtier.service.apps.cli import main

main()
