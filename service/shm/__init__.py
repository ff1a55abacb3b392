"""Same-host data plane: block bytes through a shared-memory arena, gRPC as the control plane.

* :mod:`service.shm.arena`: the sealed memfd, its mapping and the slot allocator;
* :mod:`service.shm.broker`: the server's arenas and the Unix socket that hands their fds out
  (``SCM_RIGHTS``), reclaiming an arena when its caller's connection closes;
* :mod:`service.shm.rpc`: the ``OpenArena``/``PutShm``/``GetShm`` handlers;
* :mod:`service.shm.client`: the client's end (used by :class:`service.client.KVTierClient`).

The contract of the messages is in ``proto/kvtier/v1/kvtier.proto`` ("Same-host data plane").
"""
