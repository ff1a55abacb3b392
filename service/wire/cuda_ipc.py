"""CUDA IPC of one buffer: torch's share/open exchange as the plain fields of a ``CudaIpcBuffer``.

A CUDA allocation of one process can be mapped by another process on the same GPU
(``cudaIpcOpenMemHandle``) and read device to device. torch wraps the exchange:
``UntypedStorage._share_cuda_()``, reached through
:func:`torch.multiprocessing.reductions.reduce_tensor`, gives the allocation's handle, the storage's
size and offset in it, a cross-process reference counter (a slot of a shared-memory file) and an event
handle; :func:`torch.multiprocessing.reductions.rebuild_cuda_tensor` maps them in the other process.
torch.multiprocessing pickles that tuple; here it travels as the fields of a ``kvtier.v1.CudaIpcBuffer``
message, so a reader never unpickles anything it was sent.

Primitives:

* :func:`share`: export a 1-D ``uint8`` CUDA tensor (its whole storage) as a ``CudaIpcBuffer``;
* :func:`copy_out`: map a ``CudaIpcBuffer`` on a device of this process, copy byte ranges of it into
  fresh tensors of that device, unmap it;
* :func:`release_unopened`: give back the reference of a buffer that will never be mapped;
* :func:`device_uuid` / :func:`normalize_uuid`: the identity both sides compare (device indices mean
  nothing across processes, which may see different ``CUDA_VISIBLE_DEVICES``).

Reference counting is torch's. Sharing sets the buffer's counter to 1, the reader's reference; the
reader gives it back when its mapping is freed (:func:`copy_out` frees it before returning) or with
:func:`release_unopened`. An exporter that drops the buffer while the counter is above 0 does not free
the memory: torch parks it ("limbo") until the counter reaches 0, so a reader never sees it reused
under its mapping. Hence: every shared buffer must be mapped, or released unopened, exactly once; a
reader that dies holding a mapping leaves the memory allocated until the exporter exits (torch's
documented limit). Sharing also wraps the storage's data pointer (a new wrapper per share, freed with
the storage), so share fresh, short-lived buffers, never a long-lived tensor over and over.

Trust. A mapping covers the whole allocation the buffer lies in (a segment of the exporter's caching
allocator, which may hold other tensors), so an exporter shares only with processes it trusts with its
GPU memory (:mod:`service.shm.ipc`: same host, same user). A reader checks the two fields it writes
through (the reference counter's file name and slot) before mapping anything.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence

import torch

from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb

#: Slots of one torch reference-counter file (``CUDA_IPC_REF_COUNTER_FILE_SIZE`` in torch/csrc/CudaIPCTypes.h).
REF_COUNTER_SLOTS = 10000
#: What torch names those files (``at::NewProcessWideShmHandle``: ``/torch_<pid>_<random>[_<n>]``).
_REF_COUNTER_NAME = re.compile(rb"/torch_[0-9_]{1,64}")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}")


def normalize_uuid(text: str) -> str:
    """The canonical form (lower case, 8-4-4-4-12) of a GPU UUID.

    :param text: torch's form (``str(torch.cuda.get_device_properties(i).uuid)``), nvidia-smi's
        (``GPU-`` prefixed) or 32 bare hex digits.
    :raises ValueError: for anything else (a ``MIG-`` instance included: MIG has no CUDA IPC).
    """
    s = text.strip().lower()
    s = s[4:] if s.startswith("gpu-") else s
    if not _UUID.fullmatch(s):
        raise ValueError(f"{text[:80]!r} is not a GPU UUID")
    return str(uuid.UUID(s))


def device_uuid(device: torch.device | str | int) -> str:
    """The UUID of a CUDA device of this process, as :func:`normalize_uuid` writes it.

    :raises RuntimeError: without CUDA. :raises ValueError: if torch reports no usable UUID.
    """
    return normalize_uuid(str(torch.cuda.get_device_properties(device).uuid))


def share(buffer: torch.Tensor) -> pb.CudaIpcBuffer:
    """Export ``buffer`` for one reader in another process (keep ``buffer`` alive until it is done;
    see the module docstring for the reference counting).

    :param buffer: a 1-D ``uint8`` CUDA tensor that is its whole storage (offset 0, every byte).
    :raises ValueError: for any other tensor.
    """
    if not buffer.is_cuda or buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise ValueError("CUDA IPC shares a 1-D uint8 CUDA tensor")
    if buffer.storage_offset() != 0 or buffer.numel() != buffer.untyped_storage().nbytes():
        raise ValueError("CUDA IPC shares a tensor that is its whole storage")
    from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor
    rebuild, args = reduce_tensor(buffer)
    if rebuild is not rebuild_cuda_tensor:
        raise ValueError(f"torch reduced a CUDA tensor with {rebuild.__name__}, not rebuild_cuda_tensor")
    # the argument tuple of rebuild_cuda_tensor (torch/multiprocessing/reductions.py), named field by field
    (_cls, _size, _stride, _tensor_offset, _storage_cls, _dtype, _device, mem_handle, size_bytes, offset_bytes,
     _requires_grad, ref_counter_handle, ref_counter_offset, event_handle, event_sync_required) = args
    return pb.CudaIpcBuffer(mem_handle=mem_handle, size_bytes=size_bytes, offset_bytes=offset_bytes,
                            ref_counter_handle=ref_counter_handle, ref_counter_offset=ref_counter_offset,
                            event_handle=event_handle or b"", event_sync_required=bool(event_sync_required))


def _check(buffer: pb.CudaIpcBuffer, ranges: Sequence[tuple[int, int]] = ()) -> None:
    """:raises ValueError: unless ``buffer``'s counter fields name a torch counter slot (the reader
    decrements what they name, unchecked by torch) and every range lies inside the buffer."""
    if not _REF_COUNTER_NAME.fullmatch(buffer.ref_counter_handle) or buffer.ref_counter_offset >= REF_COUNTER_SLOTS:
        raise ValueError("the buffer's reference counter is not a torch counter slot")
    if not buffer.mem_handle or not buffer.size_bytes:
        raise ValueError("the buffer has no handle or no bytes")
    for offset, length in ranges:
        if offset < 0 or length < 0 or offset + length > buffer.size_bytes:
            raise ValueError(f"range [{offset}, +{length}) is outside the {buffer.size_bytes}-byte buffer")


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def copy_out(buffer: pb.CudaIpcBuffer, device: torch.device | str,
             ranges: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """Device-to-device copies of byte ranges of a shared buffer, as fresh 1-D ``uint8`` tensors.

    Maps the buffer on ``device`` (which must be the GPU it lives on: compare :func:`device_uuid`),
    copies each ``(offset, length)`` range, waits for the copies and frees the mapping, which gives the
    reader's reference back to the exporter. Consumes the buffer's reference either way: when the
    mapping cannot be made, it is released unopened.

    :raises ValueError: for fields that do not name a torch counter slot or ranges outside the buffer
        (nothing is mapped and the reference is left alone: such fields cannot be given back).
    :raises RuntimeError: from CUDA, if the handle cannot be opened on ``device``.
    """
    device = torch.device(device)
    _check(buffer, ranges)
    from torch.multiprocessing.reductions import rebuild_cuda_tensor
    index = _index(device)
    try:
        mapped = rebuild_cuda_tensor(
            torch.Tensor, torch.Size([buffer.size_bytes]), (1,), 0, torch.storage.TypedStorage, torch.uint8, index,
            buffer.mem_handle, buffer.size_bytes, buffer.offset_bytes, False, buffer.ref_counter_handle,
            buffer.ref_counter_offset, buffer.event_handle, buffer.event_sync_required)
    except BaseException:
        # no mapping exists, so nothing will give the reference back: do it here (torch fails before
        # it builds the storage whose deleter would)
        release_unopened(buffer, device)
        raise
    try:
        out = [mapped[offset:offset + length].clone() for offset, length in ranges]
        torch.cuda.current_stream(mapped.device).synchronize()
    finally:
        del mapped  # its storage's deleter gives the reference back (after syncing this stream)
    return out


def release_unopened(buffer: pb.CudaIpcBuffer, device: torch.device | str | None = None) -> None:
    """Give back the reference of a buffer that will never be mapped (best effort, as torch's own:
    an exporter that exited has nothing left to give back to).

    :raises ValueError: if the counter fields do not name a torch counter slot.
    """
    _check(buffer)
    torch.UntypedStorage._release_ipc_counter(buffer.ref_counter_handle, buffer.ref_counter_offset,
                                              device=None if device is None else torch.device(device))
