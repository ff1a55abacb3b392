"""CUDA IPC probe for hot-tier blocks: hand a GPU block to a co-located CUDA process without a host hop.

Design note (not wired into ``GetShm`` yet). A hot block lives in the server's GPU memory; a client
on the same GPU could map it with ``cudaIpcOpenMemHandle`` and copy it device-to-device instead of
the server copying it to host (the arena) and the client copying it back. torch already wraps the
handles: :func:`torch.multiprocessing.reductions.reduce_tensor` gives the storage's IPC handle,
offset, size and a ref-count/event handle (via ``UntypedStorage._share_cuda_()``), and
``rebuild_cuda_tensor`` opens it in another process. The plan for the RPC: a ``GetShm`` flag
``cuda_device`` (the client's device UUID); for each hot block on that device the server answers the
handle fields instead of a slot, keeps the block pinned (its ``iter_blocks`` lease) until the client
releases the piece, and the client clones the mapped tensor before releasing. Both sides check
``torch.cuda.is_available()``; anything else falls back to the arena.

These two functions are that exchange for one tensor, used by ``tests/gpu/test_cuda_ipc.py`` and
``scripts/gpu_check.py``. The handle is a pickle: only ever load one from a process you trust (the
server, over your own authenticated call).
"""

from __future__ import annotations

import pickle

import torch


def export_handle(tensor: torch.Tensor) -> bytes:
    """An IPC handle of a CUDA ``tensor`` (keep the tensor alive until every importer is done).

    :raises ValueError: for a tensor not on a CUDA device.
    """
    if not tensor.is_cuda:
        raise ValueError("CUDA IPC needs a CUDA tensor")
    from torch.multiprocessing.reductions import reduce_tensor
    rebuild, args = reduce_tensor(tensor)
    return pickle.dumps((rebuild, args))


def import_copy(handle: bytes) -> torch.Tensor:
    """A device-to-device copy of the tensor behind ``handle`` (from :func:`export_handle`)."""
    rebuild, args = pickle.loads(handle)  # noqa: S301 - a handle from the trusted server (module docstring)
    mapped = rebuild(*args)
    out = mapped.clone()
    torch.cuda.current_stream(out.device).synchronize()
    del mapped
    return out
