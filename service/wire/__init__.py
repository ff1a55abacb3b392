"""What both ends of the wire share: generated stubs (_gen), proto ↔ tiering values, fast chunk codecs, the
shared-memory arena layout, the frames of its control socket and CUDA IPC buffer fields. Imports tiering's vocabulary
only."""
