"""Model fingerprints: a model id and a revision derived from the weights actually loaded and the KV config.

May import torch and, lazily, safetensors and huggingface_hub (the ``hf`` extra); never the client or server.

A namespace's ``revision`` must change whenever the KV a model computes for the same tokens can
change, and must never be borrowed from another model. :func:`model_fingerprint` derives it, in this
order, from:

1. ``revision=`` when the caller gives one (their promise; nothing is hashed);
2. the weights file a loader recorded with :func:`record_weights` (e.g. a GGUF file), or ``weights_path=``;
3. the hub commit (``config._commit_hash``) when transformers knows it, plus the weights files
   (``*.safetensors``, ``*.bin``) of the local folder or hub snapshot the model names, used only if
   the model's own tensors match those files (their first rows are compared), so a model built from a
   folder's config with fresh weights never takes the folder's hash;
4. otherwise a hash over the model's state dict (in-memory models; ~1 GB/s of weights).

Files are hashed once per (path, size, mtime) per process. With a model, the config fields that change
the KV (dtype, rope settings, layer/head geometry, attention windows) are mixed in. When nothing can
be derived (no model and no file, weights on the ``meta`` device), :class:`ValueError` asks for ``revision=``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from kvtier.tiering.keys import MAX_ID_BYTES

#: Attribute a loader sets on a model (through :func:`record_weights`) naming the file it loaded.
LOADED_FROM_ATTR = "kvtier_loaded_from"
#: Config fields that change the K/V a model computes (besides its weights).
KV_CONFIG_FIELDS = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                    "hidden_size", "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor",
                    "max_position_embeddings", "sliding_window", "layer_types", "attention_bias",
                    "attn_logit_softcapping", "query_pre_attn_scalar", "qk_layernorm", "use_qk_norm")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True, slots=True)
class ModelFingerprint:
    """Model id and weights revision: the model part of a kvtier namespace."""

    model: str
    revision: str


@dataclass(frozen=True, slots=True)
class LoadedFrom:
    """What a loader recorded: the weights file (real path) and, optionally, the model id to use."""

    path: str
    model_id: str | None = None


def record_weights(model, path: str, *, model_id: str | None = None) -> None:
    """Record on ``model`` the weights file it was loaded from, for loaders transformers cannot trace (GGUF).

    :param model_id: the id namespaces should use (default: the model's ``name_or_path``).
    """
    setattr(model, LOADED_FROM_ATTR, LoadedFrom(os.path.realpath(path), model_id))


@functools.cache
def _file_hash(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def file_hash(path: str) -> str:
    """BLAKE2b-128 hex of a file's bytes, computed once per (real path, size, mtime) per process."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return _file_hash(real, st.st_size, st.st_mtime_ns)


def _files_hash(files: list[Path], folder: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    for f in files:
        name = str(f.relative_to(folder)).encode()
        h.update(len(name).to_bytes(4, "little") + name + bytes.fromhex(file_hash(str(f))))
    return h.hexdigest()


def _hub_snapshot(repo_id: str, commit: str) -> Path | None:
    try:
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name
    except ImportError:
        return None
    folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots" / commit
    return folder if folder.is_dir() else None


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
                   and not p.name.startswith("training_args"))
    safetensors = [p for p in files if p.name.endswith(".safetensors")]
    return safetensors or files  # transformers loads safetensors when both are present


def _first_rows(path: Path, names: set[str]) -> dict[str, torch.Tensor]:
    """The first row (index 0 of dim 0) of each tensor of ``path`` named in ``names``."""
    out = {}
    if path.name.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            for name in names.intersection(fh.keys()):
                sl = fh.get_slice(name)
                out[name] = sl[0:1] if len(sl.get_shape()) else fh.get_tensor(name)
    else:
        try:
            state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
        except (RuntimeError, OSError, ValueError, pickle.UnpicklingError):
            return {}  # not a tensor archive we can read: compares nothing, so the state dict is hashed
        out = {k: v[0:1] if v.dim() else v for k, v in state.items() if isinstance(v, torch.Tensor) and k in names}
    return out


def _loaded_from_files(model, files: list[Path]) -> bool:
    """Whether ``model``'s tensors start like the files' (every shared tensor's first row is equal)."""
    state = model.state_dict()
    compared = 0
    for f in files:
        for name, row in _first_rows(f, set(state)).items():
            mine = state[name].detach()
            if mine.is_meta:
                return False
            mine = mine[0:1] if mine.dim() else mine
            if row.shape != mine.shape or not torch.equal(row.to(mine.dtype), mine.cpu()):
                return False
            compared += 1
    return compared > 0


def _state_dict_hash(model) -> str:
    state_dict = getattr(model, "state_dict", None)
    state = state_dict() if callable(state_dict) else None
    if not state:
        raise ValueError("cannot fingerprint a model without tensors: pass revision= naming its weights")
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        t = state[name].detach()
        if t.is_meta:
            raise ValueError(f"weights of {type(model).__name__} are not materialised ({name} is on the meta "
                             "device): pass revision= naming its weights")
        head = f"{name}|{t.dtype}|{tuple(t.shape)}|".encode()
        h.update(len(head).to_bytes(4, "little") + head)
        h.update(t.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _name_of(model) -> str:
    """The model's ``name_or_path`` (its config's, which transformers keeps current; else the model's)."""
    return str(getattr(getattr(model, "config", None), "name_or_path", "") or getattr(model, "name_or_path", "") or "")


def _weights_parts(model) -> list[str]:
    """``["hub:<commit>", "files:<hash>"]``, ``["hub:<commit>"]`` or ``["state:<hash>"]`` for a model."""
    cfg = getattr(model, "config", None)
    name = _name_of(model)
    commit = getattr(cfg, "_commit_hash", None)
    parts = [f"hub:{commit}"] if commit else []
    folder = Path(name) if name and os.path.isdir(name) else (_hub_snapshot(name, commit) if name and commit else None)
    files = _weight_files(folder) if folder is not None else []
    if files and _loaded_from_files(model, files):
        return parts + [f"files:{_files_hash(files, folder)}"]
    if commit and not files:
        return parts  # loaded from the hub, files not in a local cache we can find: the commit names them
    return [f"state:{_state_dict_hash(model)}"]


def kv_config_hash(model) -> str:
    """16 hex digits over the model's dtype and the config fields that change the KV (:data:`KV_CONFIG_FIELDS`)."""
    cfg = model.config
    text_of = getattr(cfg, "get_text_config", None)  # multimodal configs keep the decoder's fields apart
    text_cfg = text_of() if callable(text_of) else cfg
    fields = {k: getattr(text_cfg, k, None) for k in KV_CONFIG_FIELDS}
    fields["dtype"] = str(getattr(model, "dtype", None))
    raw = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.blake2b(raw, digest_size=8).hexdigest()


def model_fingerprint(model=None, *, model_id: str | None = None, weights_path: str | None = None,
                      revision: str | None = None) -> ModelFingerprint:
    """The model id and a revision that changes whenever the loaded weights or the KV config do.

    See the module docstring for what is hashed and in which order.

    :param model: a loaded model (transformers or any ``torch.nn.Module`` with a ``config``); may be
        ``None`` with ``weights_path`` or ``revision``.
    :param model_id: overrides the model id (default: what the loader recorded, else ``name_or_path``,
        else the weights file's name, else the model's class name).
    :param weights_path: the file to hash instead of what the model says it was loaded from.
    :param revision: the caller's own revision of the weights (nothing is hashed for them).
    :returns: a fingerprint whose revision fits a namespace (at most 256 bytes; longer ones are hashed).
    :raises ValueError: when neither the weights nor a revision can be found (``revision=`` is the fix).
    """
    loaded = getattr(model, LOADED_FROM_ATTR, None) if model is not None else None
    path = weights_path or (loaded.path if loaded is not None else None)
    if revision:
        parts = [revision]
    elif path:
        parts = [f"file:{file_hash(path)}"]
    elif model is not None:
        parts = _weights_parts(model)
    else:
        raise ValueError("nothing to fingerprint: pass a model, weights_path= or revision=")
    if model is not None and getattr(model, "config", None) is not None:
        parts.append(f"kv:{kv_config_hash(model)}")
    model_id = (model_id or (loaded.model_id if loaded is not None and not weights_path else None)
                or _name_of(model) or (os.path.basename(path) if path else "") or type(model).__name__)
    text = "+".join(parts)
    if len(text.encode()) > MAX_ID_BYTES:
        text = "blake2b:" + hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
    return ModelFingerprint(model_id, text)
