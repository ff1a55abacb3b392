"""The kvtier gRPC server: build it, run it, shut it down cleanly.

May import every ``service.server`` module, ``service.wire`` and ``tiering``; nothing imports it but the CLI and tests.

:func:`create_server` assembles a ``grpc.aio`` server around an open store (KVCache service, standard
``grpc.health.v1`` health service, server reflection) and binds it; tests and embedders use it
in-process. :func:`serve` is the process: open the store, start, write the port file, wait for
SIGTERM/SIGINT (SIGHUP re-reads ``security.tokens_file``: ``service/server/auth.py``), then shut down
in this order:

1. health says NOT_SERVING (load balancers stop sending; ``Watch`` streams see it at once);
2. ``server.stop(grace_s)``: new RPCs are refused with UNAVAILABLE, in-flight ones get ``grace_s``
   seconds to finish, then are cancelled (a cancelled Put stores nothing); the same-host socket calls
   (``shm_control.py``) are drained alike, at the same time;
3. ``store.close()``: the write-behind queue is flushed to LMDB, so every accepted block is on disk;
4. telemetry is flushed; the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvtier.service.wire import fast as wire_fast
from kvtier.service.wire.memtune import tune_malloc
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2_grpc as pb_grpc
from kvtier.service.server.auth import Authenticator, authenticator_from_settings, reload_tokens
from kvtier.service.server.config import Settings
from kvtier.service.server.core import ServerCore
from kvtier.service.server.errors import ErrorBoundary
from kvtier.service.server.quota import Limits, PutBudget
from kvtier.service.server.servicer import KVCacheServicer
from kvtier.service.server.shm_broker import ArenaRegistry
from kvtier.service.server.shm_control import ControlServer
from kvtier.service.server.telemetry import ServerTelemetryInterceptor, setup_telemetry
from kvtier.service.server.tls import check_exposure, server_credentials
from kvtier.tiering.crypto import RecordSealer, load_keys
from kvtier.tiering.store import TieredStore

log = logging.getLogger(__name__)

#: Full name of the KV cache service, as health checks and reflection know it.
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KVCache"].full_name
#: RPCs gRPC admits beyond ``server.max_concurrent_rpcs``: room kept for health checks and reflection,
#: which the KVCache limit (enforced by the :class:`ErrorBoundary`) never counts.
RESERVED_RPCS = 16


def _address(host: str, port: int) -> str:
    if host.startswith("unix:"):  # unix:///abs/path or unix:rel/path: gRPC over a Unix socket, no port
        return host
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def create_server(settings: Settings, store: TieredStore, *, health_servicer: health.aio.HealthServicer | None = None,
                  interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                  shm: ArenaRegistry | None = None, auth: Authenticator | None = None) -> tuple[grpc.aio.Server, int]:
    """A bound, not yet started ``grpc.aio`` server serving ``store``.

    :param settings: ``settings.server`` gives address, message size limit, concurrency and stream limits.
    :param store: the open engine; the server never closes it.
    :param health_servicer: the health service to register (a fresh one when omitted); keep it to
        flip it to NOT_SERVING on shutdown.
    :param interceptors: server interceptors (telemetry), outermost first; applied to KVCache RPCs only,
        around the error boundary (so they see every mapped status).
    :param shm: the shared-memory arenas to offer (default: new ones per ``settings.server.shm_*``
        when ``shm_enabled``); whoever made them closes them (:func:`serve` does).
    :param auth: who may call (default: from ``settings.security``); :func:`serve` keeps it to reload
        its tokens on SIGHUP.
    :returns: the server and the bound port (the real one when ``settings.server.port`` is 0).
    :raises RuntimeError: if the address cannot be bound.
    :raises ValueError: on unusable ``settings.security`` (token file, TLS files), or no tokens and a
        non-loopback host without ``security.allow_insecure_remote`` (``service/server/tls.py``).

    Call it with an event loop running; then ``await server.start()``.
    """
    cfg, sec = settings.server, settings.security
    auth = auth if auth is not None else authenticator_from_settings(sec)
    credentials = server_credentials(sec)
    check_exposure(cfg.host, authenticated=auth.enabled, allow_insecure_remote=sec.allow_insecure_remote)
    limits = Limits(sec.max_blocks_per_request, int(sec.tenant_memory_bytes), int(sec.tenant_cold_bytes),
                    sec.max_sessions_per_tenant)
    limit = int(cfg.max_message_bytes)
    # the one error boundary; it admits KVCache RPCs against max_concurrent_rpcs, health never counts
    boundary = ErrorBoundary(SERVICE_NAME, observers=interceptors, max_concurrent=cfg.max_concurrent_rpcs)
    server = grpc.aio.server(
        interceptors=[boundary],
        options=[("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit),
                 # one server per port: never share a port with a stale or second instance
                 ("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=cfg.max_concurrent_rpcs + RESERVED_RPCS)
    if shm is None and cfg.shm_enabled:
        shm = shm_registry(settings, store)
    core = ServerCore(store, auth=auth, limits=limits, max_put_bytes=int(cfg.max_put_bytes), max_message_bytes=limit,
                      puts=PutBudget(cfg.max_open_puts_per_tenant, int(cfg.put_pending_bytes)),
                      stream_idle_s=cfg.stream_idle_s, lossy_codecs=settings.store.lossy_codecs)
    servicer = KVCacheServicer(core, shm=shm)
    if shm is not None and cfg.shm_control:
        # PutShm/GetShm also as frames on the arena sockets, under the same boundary and telemetry
        telemetry = next((i for i in interceptors if isinstance(i, ServerTelemetryInterceptor)), None)
        shm.serve_control(ControlServer(core, shm, boundary, telemetry, limit))
    pb_grpc.add_KVCacheServicer_to_server(servicer, server)
    # Get and Put again, with codecs that write and read payload chunks without protobuf (same bytes
    # on the wire): this later registration replaces the generated handlers of those two methods.
    server.add_registered_method_handlers(SERVICE_NAME, wire_fast.fast_handlers(servicer))
    health_servicer = health_servicer or health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    try:
        address = _address(cfg.host, cfg.port)
        port = (server.add_secure_port(address, credentials) if credentials is not None
                else server.add_insecure_port(address))
    except RuntimeError as exc:
        raise RuntimeError(f"cannot listen on {_address(cfg.host, cfg.port)}: {exc}; is the port in use?") from exc
    return server, port


def shm_registry(settings: Settings, store: TieredStore) -> ArenaRegistry | None:
    """The shared-memory arenas ``settings.server`` asks for (``None`` when ``shm_enabled`` is off)."""
    cfg = settings.server
    if not cfg.shm_enabled:
        return None
    return ArenaRegistry(cfg.shm_socket, int(cfg.shm_arena_bytes), lease_s=store.config.lease_s,
                         max_per_caller=cfg.shm_arenas_per_caller, prefault=cfg.shm_prefault)


def _write_port_file(path: Path, port: int) -> None:
    # temp + rename: a reader polling for the file never sees it half written
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, path)


def _describe_tiers(store: TieredStore) -> str:
    usage = store.usage()
    devices = {t.name: f" on {t.device}" for t in store.memory}
    return ", ".join(f"{name} {usage[name]['capacity_bytes'] / 2**30:.2f} GiB{devices.get(name, '')}"
                     for name in store.tier_names())


def _describe_security(settings: Settings) -> str:
    sec = settings.security
    transport = "mutual TLS" if sec.tls_client_ca else "TLS" if sec.tls_cert else "plaintext"
    auth = "token auth" if (sec.tokens or sec.admin_tokens or sec.tokens_file) else "no auth"
    return f"{transport}, {auth}"


async def serve(settings: Settings) -> int:
    """Run the server until SIGTERM or SIGINT, then shut down (module docstring). Returns the exit code.

    :raises TierUnavailable: if the data directory is unusable or held by another process.
    :raises RuntimeError: if the address cannot be bound.
    :raises OSError: if the metrics port cannot be bound.
    """
    # Signals first: a SIGTERM while the store opens still ends in an orderly shutdown.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    telemetry = setup_telemetry(settings, set_global=True)
    tune_malloc()  # before the first block is allocated: see service/wire/memtune.py
    keys = load_keys(settings.security.cold_key_file)
    store = await asyncio.to_thread(TieredStore, settings.store_config(), tracer=telemetry.tracer,
                                    sealer=RecordSealer(keys) if keys is not None else None)
    try:
        # Metrics first: a taken metrics port then fails before a gRPC server exists (a started one
        # left unstopped would be torn down after the loop closed, with a traceback).
        telemetry.start_metrics(store)
        health_servicer = health.aio.HealthServicer()
        shm = shm_registry(settings, store)
        auth = authenticator_from_settings(settings.security)
        server, port = create_server(settings, store, health_servicer=health_servicer,
                                     interceptors=telemetry.server_interceptors(), shm=shm, auth=auth)
        # SIGHUP re-reads security.tokens_file (a small file: read on the loop, between RPCs' steps)
        loop.add_signal_handler(signal.SIGHUP, reload_tokens, auth, settings.security)
        await server.start()
        await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        if settings.server.port_file is not None:
            _write_port_file(settings.server.port_file, port)
        log.info("kvtier listening on %s (pid %d, %s): tiers %s; data dir %s; write policy %s; cold tier %s",
                 _address(settings.server.host, port), os.getpid(), _describe_security(settings),
                 _describe_tiers(store), os.path.abspath(settings.store.data_dir), settings.store.write_policy,
                 "encrypted" if keys is not None else "not encrypted")

        await stop.wait()

        log.info("shutting down: health NOT_SERVING, %.1f s grace for in-flight RPCs", settings.server.grace_s)
        await health_servicer.enter_graceful_shutdown()
        # the same-host socket calls drain alike, meanwhile (server.stop is awaited in this task itself:
        # run inside asyncio.gather it returned at once, cancelling the calls in flight)
        socket_calls = loop.create_task(shm.drain(settings.server.grace_s)) if shm is not None else None
        await server.stop(settings.server.grace_s)
        if socket_calls is not None:
            await socket_calls
        if shm is not None:
            await shm.close()
    finally:
        # Flushes the write-behind queue: every block accepted before the stop is on disk after this.
        await asyncio.to_thread(store.close)
        telemetry.shutdown()
    log.info("kvtier stopped")
    return 0
