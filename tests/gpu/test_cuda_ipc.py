"""CUDA IPC of a KV block between two processes (service/shm/cuda_ipc.py); skipped without CUDA."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from service.shm.cuda_ipc import export_handle, import_copy
from tiering.codec import checksum

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _child(handles, results) -> None:
    for handle in iter(handles.get, None):
        got = import_copy(handle)
        results.put((str(got.device), got.dtype == torch.float16, checksum(got.view(torch.uint8).cpu().numpy())))


@pytest.mark.parametrize("shape", [(2, 32, 8, 16, 128), (2, 30, 3, 7, 64)])  # 2 MiB Llama-8B block; partial block
def test_block_crosses_processes_byte_exact(shape):
    block = torch.randn(shape, device="cuda").to(torch.float16)
    ctx = mp.get_context("spawn")
    handles, results = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_child, args=(handles, results))
    child.start()
    try:
        handles.put(export_handle(block))
        device, same_dtype, csum = results.get(timeout=120)
        handles.put(None)
        child.join(60)
    finally:
        if child.is_alive():
            child.kill()
    assert device.startswith("cuda") and same_dtype
    assert csum == checksum(block.view(torch.uint8).cpu().numpy())


def test_cpu_tensor_is_refused():
    with pytest.raises(ValueError):
        export_handle(torch.zeros(4))
