"""Same-host data plane: block bytes through a shared-memory arena, gRPC as the control plane.

* :mod:`service.shm.arena`: the sealed memfd, its mapping and the slot allocator;
* :mod:`service.shm.broker`: the server's arenas and the Unix socket that hands their fds out
  (``SCM_RIGHTS``), reclaiming an arena when its caller's connection closes;
* :mod:`service.shm.rpc`: the ``OpenArena``/``PutShm``/``GetShm`` handlers;
* :mod:`service.shm.client`: the client's end (used by :class:`service.client.KVTierClient`);
* :mod:`service.shm.cuda_ipc`: one CUDA buffer shared between processes as plain fields;
* :mod:`service.shm.ipc` / :mod:`service.shm.ipc_client`: ``GetIpc``/``ReleaseIpc``, hot blocks copied
  device to device for a caller on the server's GPU, and the client's end of it.

The contract of the messages is in ``proto/kvtier/v1/kvtier.proto`` ("Same-host data plane").
"""
