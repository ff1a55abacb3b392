"""Bridges between kvtier and model libraries (transformers' DynamicCache). Installed with the ``hf`` extra;
imports the client, never the server."""
