"""The OPC UA server's security, for real: certificates generated at test time, asyncua
clients on Basic256Sha256 SignAndEncrypt channels, users, trusted client certificates and
`anonymous`, against the daemon's server on loopback."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua
from asyncua.crypto import cert_gen
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from monitor.config import OpcuaConfig
from monitor.daemon.opcua import NAMESPACE_URI, OpcuaServer
from tests.conftest import free_port
from tests.test_alarm_daemon import Rig, bright_weights  # noqa: F401 (fixture)
from tests.test_plant import rig_with  # noqa: F401 (fixture)

CLIENT_URI = "urn:pbf-monitor:test-client"
SIGN_AND_ENCRYPT = ua.MessageSecurityMode.SignAndEncrypt


@dataclass(frozen=True)
class Pki:
    """A server certificate and key, and two clients' (cert, key): one trusted, one not."""

    server_cert: Path
    server_key: Path
    trusted_dir: Path
    trusted: tuple[Path, Path]
    stranger: tuple[Path, Path]


def _write_cert(folder: Path, name: str, uri: str, usage: x509.ObjectIdentifier, *,
                pem: bool) -> tuple[Path, Path]:
    """A self-signed application certificate (RSA 2048, SHA-256) and its PEM key."""
    key = cert_gen.generate_private_key()
    cert = cert_gen.generate_self_signed_app_certificate(
        key, name, {}, [x509.UniformResourceIdentifier(uri), x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))], [usage])
    # The server's files are PEM under the names they usually have (.crt, .key), which
    # asyncua would read as DER by their suffix; the clients' are what asyncua reads.
    cert_path = folder / (f"{name}.crt" if pem else f"{name}.der")
    key_path = folder / (f"{name}.key" if pem else f"{name}.pem")
    cert_path.write_bytes(cert.public_bytes(Encoding.PEM if pem else Encoding.DER))
    key_path.write_bytes(cert_gen.dump_private_key_as_pem(key))
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    server = _write_cert(d, "server", NAMESPACE_URI, ExtendedKeyUsageOID.SERVER_AUTH, pem=True)
    trusted = _write_cert(d, "trusted", CLIENT_URI, ExtendedKeyUsageOID.CLIENT_AUTH, pem=False)
    stranger = _write_cert(d, "stranger", CLIENT_URI, ExtendedKeyUsageOID.CLIENT_AUTH,
                           pem=False)
    trusted_dir = d / "trusted-clients"
    trusted_dir.mkdir()
    (trusted_dir / "trusted.der").write_bytes(trusted[0].read_bytes())
    return Pki(*server, trusted_dir, trusted, stranger)


async def secure_client(url: str, pki: Pki, *, channel: tuple[Path, Path] | None = None,
                        user: str = "", token: tuple[Path, Path] | None = None) -> Client:
    """A client on a Basic256Sha256 SignAndEncrypt channel with the `channel` certificate
    (default: the untrusted one), logging in as `user` ("name:password"), with the `token`
    certificate (an X509 identity token), or anonymously. Found by discovery, as clients
    do: GetEndpoints on a None channel first."""
    c = Client(url)
    c.application_uri = CLIENT_URI
    cert, key = channel or pki.stranger
    await c.set_security(SecurityPolicyBasic256Sha256, str(cert), str(key),
                         mode=SIGN_AND_ENCRYPT)
    if user:
        name, _, password = user.partition(":")
        c.set_user(name)
        c.set_password(password)
    if token is not None:
        await c.load_client_certificate(str(token[0]))
        await c.load_private_key(token[1])
    return c


def users_file(tmp_path: Path) -> Path:
    users = tmp_path / "users"
    users.write_text("op:secret\n")
    users.chmod(0o600)
    return users


def test_opcua_sign_and_encrypt_on_the_daemon(rig_with: Callable[[str], Rig], pki: Pki,  # noqa: F811
                                              tmp_path: Path) -> None:
    """SignAndEncrypt only: an anonymous client browses and reads a layer's values, a user
    acknowledges the real alarm."""
    url = f"opc.tcp://127.0.0.1:{free_port()}/pbf-monitor"
    r = rig_with(f'[opcua]\nenabled = true\nendpoint = "{url}"\n'
                 'security_policy = ["Basic256Sha256_SignAndEncrypt"]\n'
                 f'certificate = "{pki.server_cert}"\nprivate_key = "{pki.server_key}"\n'
                 f'users_file = "{users_file(tmp_path)}"\nanonymous = "read"\n')
    for n in (1, 2):  # 1 mm² of swelling twice: the rule opens an alarm at layer 2
        r.write(n, (20, 20, 10, 10))
    assert r.listener is not None
    r.listener.wait(lambda: bool(r.alarms()))  # it may follow layer 2's message
    (alarm,) = r.alarms()
    printer = "PbfMonitor/Printers/default"
    state = f"{printer}/Alarms/Alarm{alarm['id']}/State"

    async def until(c: Client, path: str, want: Any) -> Any:
        node = c.get_node(ua.NodeId(path, await c.get_namespace_index(NAMESPACE_URI)))
        for _ in range(200):
            if (value := await node.read_value()) == want:
                break
            await asyncio.sleep(0.05)
        return value

    async def scenario() -> None:
        async with await secure_client(url, pki) as c:
            assert (c.security_policy.URI, c.security_policy.Mode) == (
                SecurityPolicyBasic256Sha256.URI, SIGN_AND_ENCRYPT)
            idx = await c.get_namespace_index(NAMESPACE_URI)
            root = c.get_node(ua.NodeId("PbfMonitor", idx))
            names = {(await ch.read_browse_name()).Name for ch in await root.get_children()}
            assert {"Heartbeat", "Printers", "Ack", "Mute", "Unmute"} <= names
            assert await until(c, f"{printer}/LastLayer/Number", 2) == 2
            area = c.get_node(ua.NodeId(f"{printer}/LastLayer/Classes/swelling/AreaMm2", idx))
            assert await area.read_value() == pytest.approx(1.0)
            assert await c.get_node(ua.NodeId(state, idx)).read_value() == "open"
        async with await secure_client(url, pki, user="op:secret") as op:
            idx = await op.get_namespace_index(NAMESPACE_URI)
            ok, reply = await op.get_node(ua.NodeId("PbfMonitor", idx)).call_method(
                ua.NodeId("PbfMonitor/Ack", idx), ua.Variant(alarm["id"], ua.VariantType.Int64))
            assert ok, reply
            assert json.loads(reply)["alarm"]["state"] == "acknowledged"
            assert await until(op, state, "acknowledged") == "acknowledged"

    asyncio.run(scenario())
    r.listener.wait(lambda: any(a["state"] == "acknowledged" for a in r.alarms()))


class Recorder:
    """The state endpoint's handler stand-in: records the requests the methods make."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, req: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(req)
        return {"alarm": {"id": req["id"], "state": "acknowledged"}}


def secure_server(tmp_path: Path, pki: Pki, anonymous: str, handler: Recorder) -> tuple[
        OpcuaServer, str]:
    url = f"opc.tcp://127.0.0.1:{free_port()}/pbf-monitor"
    cfg = OpcuaConfig(enabled=True, endpoint=url, anonymous=anonymous,
                      security_policy=("Basic256Sha256_SignAndEncrypt",),
                      certificate=pki.server_cert, private_key=pki.server_key,
                      users_file=users_file(tmp_path), trusted_client_certs_dir=pki.trusted_dir)
    server = OpcuaServer(cfg, handler=handler, health=dict)
    server.start()
    return server, url


async def read_and_ack(c: Client) -> tuple[bool, str]:
    """Read the namespace array, then call Ack(3)."""
    idx = await c.get_namespace_index(NAMESPACE_URI)
    result: tuple[bool, str] = await c.get_node(ua.NodeId("PbfMonitor", idx)).call_method(
        ua.NodeId("PbfMonitor/Ack", idx), ua.Variant(3, ua.VariantType.Int64))
    return result


# Every login over SignAndEncrypt; the channel's certificate is the untrusted one unless the
# row says "channel:trusted". What each may do: call Ack, only read, or refused at session
# activation (the error). anonymous = "read" for everyone else is
# test_plant.test_opcua_read_only_anonymous_cannot_call.
LOGINS = [
    ("off", "anonymous", ua.uaerrors.BadIdentityTokenRejected),
    ("off", "user:right", "call"),
    ("off", "user:wrong", ua.uaerrors.BadUserAccessDenied),
    ("off", "token:trusted", "call"),
    ("off", "token:stranger", ua.uaerrors.BadUserAccessDenied),
    # The channel's certificate logs in only with an anonymous token, which "off" refuses:
    # a trusted client logs in with its certificate as an X509 identity token then.
    ("off", "channel:trusted", ua.uaerrors.BadIdentityTokenRejected),
    ("read", "token:trusted", "call"),
    ("read", "token:stranger", "read"),  # not trusted: anonymous, as without a certificate
    ("read", "channel:trusted", "call"),
    ("read", "channel:stranger", "read"),
]


async def login_and_try(url: str, pki: Pki, login: str, may: Any) -> None:
    """Log in as `login` says and do what `may` says it may (or be refused with it)."""
    kind, _, which = login.partition(":")
    cert = pki.trusted if which == "trusted" else pki.stranger
    options: dict[str, Any] = {
        "anonymous": {}, "user": {"user": "op:secret" if which == "right" else "op:wrong"},
        "token": {"token": cert}, "channel": {"channel": cert}}[kind]
    c = await secure_client(url, pki, **options)
    if not isinstance(may, str):
        with pytest.raises(may):
            await c.connect()
        return
    async with c:
        if may == "call":
            ok, reply = await read_and_ack(c)
            assert ok, reply
        else:
            with pytest.raises(ua.uaerrors.BadUserAccessDenied):
                await read_and_ack(c)


@pytest.mark.parametrize("anonymous", sorted({a for a, _, _ in LOGINS}))
def test_opcua_logins_over_sign_and_encrypt(anonymous: str, pki: Pki, tmp_path: Path) -> None:
    """Every login of the table against one server (its start and stop cost more than a
    login): what each may do, and that only the calls it may make reach the handler."""
    handler = Recorder()
    server, url = secure_server(tmp_path, pki, anonymous, handler)
    try:
        for _, login, may in [row for row in LOGINS if row[0] == anonymous]:
            handler.calls.clear()
            asyncio.run(login_and_try(url, pki, login, may))
            assert handler.calls == ([{"cmd": "ack", "id": 3}] if may == "call" else []), login
    finally:
        server.stop()


def test_opcua_secure_only_server_answers_only_discovery_on_a_none_channel(
        pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client may open a None channel to a server that offers no None endpoint (asyncua's
    server used to serve such a session without any permission check: anonymous read-only
    clients could call Ack, unencrypted). GetEndpoints is answered there, nothing else."""
    handler = Recorder()
    server, url = secure_server(tmp_path, pki, "read", handler)

    async def scenario() -> None:
        endpoints = await Client(url).connect_and_get_server_endpoints()
        assert {(e.SecurityPolicyUri, e.SecurityMode) for e in endpoints} == {
            (SecurityPolicyBasic256Sha256.URI, SIGN_AND_ENCRYPT)}
        async with await secure_client(url, pki) as s:
            idx = await s.get_namespace_index(NAMESPACE_URI)
        # A client that does not insist on an endpoint the server offers: asyncua's, with
        # its one check removed.
        monkeypatch.setattr(Client, "find_endpoint",
                            staticmethod(lambda endpoints, mode, uri: endpoints[0]))
        for user in ("", "op:secret"):
            c = Client(url)
            if user:
                c.set_user("op")
                c.set_password("secret")
            async with c:
                assert c.security_policy.Mode == ua.MessageSecurityMode.None_
                with pytest.raises(ua.uaerrors.BadUserAccessDenied):
                    await c.get_namespace_index(NAMESPACE_URI)
                with pytest.raises(ua.uaerrors.BadUserAccessDenied):
                    await c.get_node(ua.NodeId("PbfMonitor", idx)).call_method(
                        ua.NodeId("PbfMonitor/Ack", idx), ua.Variant(3, ua.VariantType.Int64))

    try:
        asyncio.run(scenario())
    finally:
        server.stop()
    assert handler.calls == []
