"""TLS and mutual TLS on the listener, with a CA and certificates made here (``cryptography``), against
real ``kvtier serve`` processes on 127.0.0.1."""

from __future__ import annotations

import datetime
import ipaddress
import pathlib
import time

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2_grpc as pb_grpc
from kvtier.service.client.client import KVTierClient
from tests.fixtures.server import KVTierProcess

TOKEN = "tok-tls-3e1f"


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, issuer_name: x509.Name | None, issuer_key, key, *, ca: bool = False,
          server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    if not ca:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


class Pki:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, as PEM files."""

    def __init__(self, root: pathlib.Path, name: str = "kvtier-test-ca") -> None:
        root.mkdir(parents=True, exist_ok=True)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _cert(name, None, ca_key, ca_key, ca=True)
        self.ca_pem = ca.public_bytes(serialization.Encoding.PEM)
        srv_key, cli_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        srv = _cert("127.0.0.1", ca.subject, ca_key, srv_key, server=True)
        cli = _cert("client-1", ca.subject, ca_key, cli_key)
        self.client_cert, self.client_key = cli.public_bytes(serialization.Encoding.PEM), _pem_key(cli_key)
        self.files = {}
        for fname, data in {"ca.pem": self.ca_pem, "server.pem": srv.public_bytes(serialization.Encoding.PEM),
                            "server.key": _pem_key(srv_key)}.items():
            (root / fname).write_bytes(data)
            self.files[fname] = str(root / fname)

    def client_credentials(self, *, with_cert: bool = True) -> grpc.ChannelCredentials:
        if with_cert:
            return grpc.ssl_channel_credentials(self.ca_pem, self.client_key, self.client_cert)
        return grpc.ssl_channel_credentials(self.ca_pem)


class TLSProcess(KVTierProcess):
    """A server whose readiness is probed over TLS (the base class probes in plaintext)."""

    credentials: grpc.ChannelCredentials

    def _wait_serving(self, end: float) -> None:
        with grpc.secure_channel(self.target, self.credentials) as channel:
            grpc.channel_ready_future(channel).result(timeout=max(end - time.monotonic(), 1.0))


def start(tmp_path, pki: Pki, *, mutual: bool) -> TLSProcess:
    env = {"KVTIER_SECURITY__TLS_CERT": pki.files["server.pem"], "KVTIER_SECURITY__TLS_KEY": pki.files["server.key"],
           "KVTIER_SECURITY__TOKENS": f'{{"{TOKEN}": "tls-tenant"}}'}
    if mutual:
        env["KVTIER_SECURITY__TLS_CLIENT_CA"] = pki.files["ca.pem"]
    proc = TLSProcess(tmp_path / ("mtls" if mutual else "tls"), extra_env=env)
    proc.credentials = pki.client_credentials(with_cert=mutual)
    return proc.start()


def lookup(channel: grpc.Channel) -> pb.LookupResponse:
    from tests.fixtures import wire
    return pb_grpc.KVCacheStub(channel).Lookup(pb.LookupRequest(namespace=wire.namespace(), token_ids=[1, 2]),
                                               metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=5)


def refused(channel: grpc.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        lookup(channel)
    return err.value.code()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"))


def test_tls_serves_tls_clients_only(tmp_path, pki):
    proc = start(tmp_path, pki, mutual=False)
    try:
        with grpc.secure_channel(proc.target, pki.client_credentials(with_cert=False)) as ch:
            assert lookup(ch).cached_blocks == 0
        with grpc.insecure_channel(proc.target) as ch:
            assert refused(ch) == grpc.StatusCode.UNAVAILABLE
        with KVTierClient(proc.target, token=TOKEN, credentials=pki.client_credentials(with_cert=False)) as kv:
            kv.wait_ready(10)
        assert "TLS, token auth" in proc.log_text()
    finally:
        proc.kill()


def test_mutual_tls_requires_a_client_certificate_from_the_ca(tmp_path, pki):
    proc = start(tmp_path, pki, mutual=True)
    try:
        with grpc.secure_channel(proc.target, pki.client_credentials()) as ch:
            assert lookup(ch).cached_blocks == 0
        with grpc.secure_channel(proc.target, pki.client_credentials(with_cert=False)) as ch:
            assert refused(ch) == grpc.StatusCode.UNAVAILABLE
        stranger = Pki(tmp_path / "other-pki", name="stranger-ca")
        creds = grpc.ssl_channel_credentials(pki.ca_pem, stranger.client_key, stranger.client_cert)
        with grpc.secure_channel(proc.target, creds) as ch:
            assert refused(ch) == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(proc.target) as ch:
            assert refused(ch) == grpc.StatusCode.UNAVAILABLE
        assert "mutual TLS" in proc.log_text()
    finally:
        proc.kill()


def test_half_configured_tls_is_a_startup_error(tmp_path, pki):
    proc = KVTierProcess(tmp_path / "half", extra_env={"KVTIER_SECURITY__TLS_CERT": pki.files["server.pem"]},
                         start_timeout=30)
    with pytest.raises(RuntimeError, match="tls_cert and security.tls_key must be set together"):
        proc.start()
