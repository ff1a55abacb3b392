"""kvtier's service layer: gRPC server, client, configuration, telemetry and the ``kvtier`` CLI."""

__version__ = "0.1.0"
