"""The OPC UA server: its owner thread, its own asyncio loop, and the address space.

Fed the committed outbox stream like the ZeroMQ publisher (after the commit, with the same
seq). At start the address space shows the present from the database (each printer's build
and last layer, the open alarms) before the server listens, then the messages after the
server's cursor (monitor.daemon.sinks) are emitted as events. Nodes have string NodeIds
built from their path under a fixed namespace URI, so a client's configured ids survive
restarts:

    PbfMonitor/Heartbeat/{Status,UptimeS,LayersOk,LayersError,Queue,LastSeq,Timestamp}
    PbfMonitor/Printers/<printer>/{Build,LastLayer/...,Alarms/Alarm<id>/...}
    PbfMonitor/{Ack,Mute,Unmute}   methods: the state endpoint's handler, same requests

Alarm transitions are also OPC UA events of type PbfAlarmEventType on PbfMonitor.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from asyncua import Node, Server, ua
from asyncua.crypto.permission_rules import USER_TYPES, PermissionRuleset, User, UserRole
from asyncua.crypto.security_policies import SecurityPolicyFactory, SecurityPolicyNone

from monitor.config import OpcuaConfig
from monitor.errors import ConfigError
from monitor.records import Outgoing, Present

log = logging.getLogger(__name__)

NAMESPACE_URI = "urn:pbf-monitor"
ROOT = "PbfMonitor"
EVENT_TYPE = "PbfAlarmEventType"
EVENT_FIELDS = (("AlarmId", ua.VariantType.Int64), ("Printer", ua.VariantType.String),
                ("Build", ua.VariantType.String), ("Layer", ua.VariantType.Int64),
                ("Class", ua.VariantType.String), ("Rule", ua.VariantType.String),
                ("AlarmSeverity", ua.VariantType.String), ("State", ua.VariantType.String),
                ("Value", ua.VariantType.Double), ("Threshold", ua.VariantType.Double),
                ("Part", ua.VariantType.Int64), ("Seq", ua.VariantType.Int64))
DEFAULT_PRINTER = "default"  # the node name of the single printer (named "" in messages)
Handler = Callable[[dict[str, Any]], dict[str, Any]]
_STOP = object()

_WRITE = {ua.NodeId(ua.ObjectIds.WriteRequest_Encoding_DefaultBinary),
          ua.NodeId(ua.ObjectIds.CallRequest_Encoding_DefaultBinary)}


class _Ruleset(PermissionRuleset):  # type: ignore[misc]
    """Users may call methods; anonymous clients may too only with anonymous = "write"."""

    def __init__(self, anonymous: str) -> None:
        every = {ua.NodeId(t) for t in USER_TYPES}
        self._allowed = {UserRole.User: every,
                         UserRole.Anonymous: every if anonymous == "write" else every - _WRITE}

    def check_validity(self, user: User, action_type_id: ua.NodeId, body: Any) -> bool:
        return action_type_id in self._allowed.get(user.role, set())


class _DiscoveryOnly(PermissionRuleset):  # type: ignore[misc]
    """Every request in a session refused: GetEndpoints and FindServers only."""

    def check_validity(self, user: User, action_type_id: ua.NodeId, body: Any) -> bool:
        return False


class _Users:
    """users_file (user:password lines), trusted client certificates, and anonymous."""

    def __init__(self, cfg: OpcuaConfig) -> None:
        self.anonymous = cfg.anonymous
        self.passwords: dict[str, str] = {}
        self.certs: set[bytes] = set()
        if cfg.users_file is not None:
            self.passwords = _read_users(cfg.users_file)
        if cfg.trusted_client_certs_dir is not None:
            self.certs = _read_certs(cfg.trusted_client_certs_dir)

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> User | None:
        import hmac

        if username:
            want = self.passwords.get(username)
            if want is not None and hmac.compare_digest(want.encode(), (password or "").encode()):
                return User(role=UserRole.User, name=username)
            return None
        # The client's certificate as its secure channel (Sign, SignAndEncrypt) verified it,
        # or an X509 identity token's: DER bytes, or empty under security policy None.
        if certificate:
            der = certificate if isinstance(certificate, bytes) else _der(certificate)
            if der in self.certs:
                return User(role=UserRole.User, name="certificate")
        return None if self.anonymous == "off" else User(role=UserRole.Anonymous)


def _der(certificate: Any) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return bytes(certificate.public_bytes(Encoding.DER))


def _format(path: Path) -> str:
    """"pem" or "der", by the file's content (a missing file is reported by its loader)."""
    try:
        with path.open("rb") as f:
            return "pem" if b"-----BEGIN" in f.read(4096) else "der"
    except OSError:
        return "der"


def _read_users(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except OSError as e:
        raise ConfigError(f"opcua.users_file {path}: cannot read ({e.strerror or e})") from e
    if mode & 0o077:
        log.warning("opcua.users_file %s is readable by others: chmod 600 it", path)
    users = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise ConfigError(f"opcua.users_file {path}:{n}: expected 'user:password'")
        users[user] = password
    return users


def _read_certs(folder: Path) -> set[bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    certs = set()
    try:
        files = sorted(folder.iterdir())
    except OSError as e:
        raise ConfigError(f"opcua.trusted_client_certs_dir {folder}: cannot read "
                          f"({e.strerror or e})") from e
    for f in files:
        if f.suffix.lower() not in (".der", ".pem", ".crt"):
            continue
        data = f.read_bytes()
        try:
            cert = (x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data
                    else x509.load_der_x509_certificate(data))
        except ValueError as e:
            raise ConfigError(f"opcua.trusted_client_certs_dir: {f} is not a certificate "
                              f"({e})") from e
        certs.add(cert.public_bytes(Encoding.DER))
    return certs


_POLICIES = {
    "None": ua.SecurityPolicyType.NoSecurity,
    "Basic256Sha256_Sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
    "Basic256Sha256_SignAndEncrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
}


class OpcuaServer:
    """Owns the asyncua Server on its own thread and loop; others hand it messages."""

    name = "opcua"  # its cursor's name in the database

    def __init__(self, cfg: OpcuaConfig, *, handler: Handler,
                 health: Callable[[], dict[str, Any]], heartbeat_interval_s: float = 5.0,
                 on_cursor: Callable[[int], None] | None = None) -> None:
        self.cfg = cfg
        self.handler = handler
        self._health = health
        self.heartbeat_interval_s = heartbeat_interval_s
        self._on_cursor = on_cursor
        self.last_seq = 0  # the newest seq applied: every one up to it is (the cursor)
        self._present = Present(0)
        self._users = _Users(cfg)  # ConfigError here, before any thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._q: asyncio.Queue[Any] | None = None
        self._started = threading.Event()
        self._error: str | None = None
        self._thread = threading.Thread(target=self._run, name="opcua", daemon=True)
        self._nodes: dict[str, Node] = {}
        self._server: Server | None = None
        self._idx = 0
        self._event: Any = None

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self, *, cursor: int = 0, present: Present | None = None) -> None:
        """Show the present, then bind, on the owner thread; ConfigError if the server cannot
        start. Messages up to present.seq handed to it later only raise their events."""
        self.last_seq = cursor
        self._present = present or Present(0)
        self._thread.start()
        self._started.wait(30)
        if self._error or not self._started.is_set():
            self._thread.join(5)
            raise ConfigError(f"opcua.endpoint {self.cfg.endpoint}: cannot serve "
                              f"({self._error or 'no answer within 30 s'})")

    def publish(self, messages: Iterable[Outgoing]) -> None:
        batch = list(messages)
        if batch and self._loop is not None and self._q is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: stopping
                self._loop.call_soon_threadsafe(self._q.put_nowait, batch)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving. Idempotent."""
        if self._thread.is_alive() and self._loop is not None and self._q is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._q.put_nowait, _STOP)
            self._thread.join(timeout)

    # ------------------------------------------------------------ the owner thread

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as e:
            log.exception("OPC UA server failed")
            self._error = self._error or repr(e)
            self._started.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._q = asyncio.Queue()
        try:
            server = await self._init_server()
            for m in self._present.messages:  # before a client can connect
                await self._show(m)
            await server.start()
        except Exception as e:
            self._error = f"{type(e).__name__}: {e}"
            self._started.set()
            return
        self._server = server
        log.info("OPC UA on %s", self.cfg.endpoint)
        self._started.set()
        try:
            await self._beat()
            while True:
                try:
                    item = await asyncio.wait_for(self._q.get(), self.heartbeat_interval_s)
                except TimeoutError:
                    await self._beat()
                    continue
                if item is _STOP:
                    return
                applied = self.last_seq
                for m in item:
                    if m.seq <= self.last_seq:
                        continue  # applied already
                    try:
                        await self._apply(m)
                    except Exception:  # one odd message never stops the server
                        log.exception("OPC UA: could not apply message seq %d", m.seq)
                    self.last_seq = m.seq
                if self.last_seq > applied and self._on_cursor is not None:
                    self._on_cursor(self.last_seq)
        finally:
            await server.stop()

    async def _init_server(self) -> Server:
        cfg = self.cfg
        server = Server(user_manager=self._users)
        await server.init()
        server.set_endpoint(cfg.endpoint)
        server.set_server_name("pbf-monitor")
        await server.set_application_uri(NAMESPACE_URI)
        if cfg.certificate is not None and cfg.private_key is not None:
            # By content: asyncua reads PEM only from a file named *.pem (a PEM server.crt
            # or server.key would be parsed as DER).
            await server.load_certificate(cfg.certificate, format=_format(cfg.certificate))
            await server.load_private_key(cfg.private_key, format=_format(cfg.private_key))
        server.set_security_policy([_POLICIES[p] for p in cfg.security_policy],
                                   permission_ruleset=_Ruleset(cfg.anonymous))
        if "None" not in cfg.security_policy:
            # A client may open a None channel to a server that offers no None endpoint:
            # asyncua keeps a connection's initial None policy, which has no permission
            # ruleset, so sessions on it could read and call Ack unencrypted, whatever
            # `anonymous` says. On such a channel only discovery (GetEndpoints, which clients
            # need to find the secure endpoints) is answered. Start adds the configured
            # policies to this list.
            server._policies.append(SecurityPolicyFactory(
                SecurityPolicyNone, ua.MessageSecurityMode.None_,
                permission_ruleset=_DiscoveryOnly()))
        tokens: list[type] = [ua.UserNameIdentityToken, ua.X509IdentityToken]
        if cfg.anonymous != "off":
            tokens.append(ua.AnonymousIdentityToken)
        server.set_identity_tokens(tokens)
        self._idx = await server.register_namespace(NAMESPACE_URI)
        root = await server.nodes.objects.add_object(self._id(ROOT), ROOT)
        self._nodes[ROOT] = root
        await root.set_event_notifier([ua.EventNotifier.SubscribeToEvents])
        await self._obj(f"{ROOT}/Printers")
        # Built like create_custom_event_type, but with string ids that survive restarts.
        etype = await server.get_node(ua.ObjectIds.BaseEventType).add_object_type(
            self._id(EVENT_TYPE), EVENT_TYPE)
        for name, vtype in EVENT_FIELDS:
            await etype.add_property(self._id(f"{EVENT_TYPE}/{name}"), name,
                                     ua.get_default_value(vtype), varianttype=vtype)
        self._event = await server.get_event_generator(etype, root)
        await self._methods(root)
        return server

    def _id(self, path: str) -> ua.NodeId:
        return ua.NodeId(path, self._idx)

    async def _obj(self, path: str) -> Node:
        node = self._nodes.get(path)
        if node is None:
            parent_path, _, name = path.rpartition("/")
            parent = await self._obj(parent_path)
            node = self._nodes[path] = await parent.add_object(self._id(path), name)
        return node

    async def _var(self, path: str, value: Any, vtype: ua.VariantType | None = None) -> None:
        """Set (creating it the first time) a read-only variable."""
        if vtype is None:
            vtype = _vtype(value)
        variant = ua.Variant(value, vtype)
        node = self._nodes.get(path)
        if node is None:
            parent_path, _, name = path.rpartition("/")
            parent = await self._obj(parent_path)
            self._nodes[path] = await parent.add_variable(self._id(path), name, variant)
        else:
            await node.write_value(variant)

    async def _drop(self, path: str) -> None:
        node = self._nodes.pop(path, None)
        if node is not None:
            for p in [p for p in self._nodes if p.startswith(path + "/")]:
                del self._nodes[p]
            await node.delete(recursive=True)

    async def _beat(self) -> None:
        h = self._health()
        hb = f"{ROOT}/Heartbeat"
        await self._var(f"{hb}/Status", str(h.get("status", "")))
        await self._var(f"{hb}/UptimeS", float(h.get("uptime_s", 0.0)))
        await self._var(f"{hb}/LayersOk", int(h.get("layers_ok", 0)))
        await self._var(f"{hb}/LayersError", int(h.get("layers_error", 0)))
        await self._var(f"{hb}/Queue", int(h.get("queue", 0)))
        await self._var(f"{hb}/LastSeq", int(self.last_seq))
        await self._var(f"{hb}/Timestamp", datetime.now(UTC))

    async def _apply(self, m: Outgoing) -> None:
        """A message into the address space (unless the present shown at start has it
        already), and an alarm transition's event."""
        if m.seq > self._present.seq:
            await self._show(m)
        if m.topic == "alarm":
            await self._alarm_event(m.payload, m.seq)

    async def _show(self, m: Outgoing) -> None:
        """A layer or alarm message's values into the address space."""
        p = m.payload
        if p.get("test"):
            return
        base = f"{ROOT}/Printers/{p.get('printer') or DEFAULT_PRINTER}"
        if m.topic == "layer":
            await self._var(f"{base}/Build", str(p["build"]))
            ll = f"{base}/LastLayer"
            await self._var(f"{ll}/Number", int(p["layer"]), ua.VariantType.Int64)
            await self._var(f"{ll}/Status", str(p["status"]))
            await self._var(f"{ll}/Time", datetime.fromtimestamp(float(p["timestamp"]), UTC))
            await self._var(f"{ll}/Seq", int(m.seq), ua.VariantType.Int64)
            for cls, st in (p.get("classes") or {}).items():
                await self._var(f"{ll}/Classes/{cls}/AreaFraction",
                                float(st.get("area_fraction", 0.0)))
                await self._var(f"{ll}/Classes/{cls}/AreaMm2", float(st.get("area_mm2", 0.0)))
            for part in p.get("parts") or []:
                await self._var(f"{ll}/Parts/Part{part['id']}/PrintedFraction",
                                float(part["printed_fraction"]))
        elif m.topic == "alarm":
            path = f"{base}/Alarms/Alarm{p['id']}"
            if p["state"] == "cleared":
                await self._drop(path)
            else:
                await self._var(f"{path}/Id", int(p["id"]), ua.VariantType.Int64)
                for key, name in (("build", "Build"), ("class", "Class"), ("rule", "Rule"),
                                  ("severity", "Severity"), ("state", "State")):
                    await self._var(f"{path}/{name}", str(p.get(key) or ""))
                await self._var(f"{path}/Layer", int(p["layer"]), ua.VariantType.Int64)
                await self._var(f"{path}/Value", float(p["value"]))
                await self._var(f"{path}/Threshold", float(p["threshold"]))
                await self._var(f"{path}/Part", -1 if p.get("part") is None else int(p["part"]),
                                ua.VariantType.Int64)

    async def _alarm_event(self, p: dict[str, Any], seq: int) -> None:
        ev = self._event.event
        ev.AlarmId = int(p.get("id") or 0)
        ev.Printer = str(p.get("printer") or "")
        ev.Build = str(p.get("build") or "")
        ev.Layer = int(p.get("layer") or 0)
        ev.Class = str(p.get("class") or "")
        ev.Rule = str(p.get("rule") or "")
        ev.AlarmSeverity = str(p.get("severity") or "")
        ev.State = str(p.get("state") or "")
        ev.Value = float(p.get("value") or 0.0)
        ev.Threshold = float(p.get("threshold") or 0.0)
        ev.Part = -1 if p.get("part") is None else int(p["part"])
        ev.Seq = int(seq)
        ev.Severity = 900 if p.get("severity") == "critical" else 500
        await self._event.trigger(
            time_attr=datetime.now(UTC),
            message=f"alarm {p.get('id')} {p.get('rule')} {p.get('state')}")

    async def _methods(self, root: Node) -> None:
        out = [_arg("ok", ua.ObjectIds.Boolean), _arg("reply", ua.ObjectIds.String)]
        target = [_arg("printer", ua.ObjectIds.String), _arg("build", ua.ObjectIds.String),
                  _arg("class", ua.ObjectIds.String)]

        def call(make: Callable[..., dict[str, Any]]) -> Callable[..., Any]:
            async def method(parent: ua.NodeId, *args: ua.Variant) -> list[ua.Variant]:
                try:
                    req = make(*[a.Value for a in args])
                    loop = asyncio.get_running_loop()
                    # The handler waits for the analyser and the database: not on this loop.
                    reply = await loop.run_in_executor(None, self.handler, req)
                except Exception as e:  # a bad argument, or the handler failing
                    reply = {"ok": False, "error": f"bad request: {e!r}"}
                ok = bool(reply.pop("ok", True))
                return [ua.Variant(ok, ua.VariantType.Boolean),
                        ua.Variant(json.dumps(reply, default=str), ua.VariantType.String)]
            return method

        def mute(cmd: str) -> Callable[..., dict[str, Any]]:
            def make(printer: str, build: str, cls: str) -> dict[str, Any]:
                req = {"cmd": cmd, "build": build, "class": cls or None}
                return {**req, "printer": printer} if printer else req  # else the default
            return make

        for name, make, args in (
                ("Ack", lambda i: {"cmd": "ack", "id": int(i)}, [_arg("id", ua.ObjectIds.Int64)]),
                ("Mute", mute("mute"), target), ("Unmute", mute("unmute"), target)):
            await root.add_method(self._id(f"{ROOT}/{name}"), name, call(make), args, out)


def _arg(name: str, dtype: int) -> ua.Argument:
    a = ua.Argument()
    a.Name = name
    a.DataType = ua.NodeId(dtype)
    a.ValueRank = -1
    return a


def _vtype(value: Any) -> ua.VariantType:
    if isinstance(value, bool):
        return ua.VariantType.Boolean
    if isinstance(value, int):
        return ua.VariantType.Int64
    if isinstance(value, float):
        return ua.VariantType.Double
    if isinstance(value, datetime):
        return ua.VariantType.DateTime
    return ua.VariantType.String
