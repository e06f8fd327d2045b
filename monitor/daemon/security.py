"""Optional CurveZMQ encryption and authentication for the PUB and state endpoints.

A server holds a secret key file and a folder of authorized client public keys (``*.key``);
a client holds the server's public key file and its own secret key file. Key files are the
ZeroMQ certificate format written by `zmq.auth.create_certificates`. With CURVE off (the
default) the endpoints are plain and should stay on loopback.
"""

from __future__ import annotations

import logging
import os
import resource
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from monitor.errors import ConfigError

log = logging.getLogger(__name__)

# A peer that connects and never completes the ZMTP handshake (nor CURVE's) holds a
# descriptor: both endpoints drop it after this long (libzmq's default is 30 s).
HANDSHAKE_MS = 5000


@dataclass(frozen=True)
class CurveServer:
    """Server side: our secret key, and the folder of client public keys let in."""

    secret_key_file: Path
    authorized_dir: Path


@dataclass(frozen=True)
class CurveClient:
    """Client side: the server's public key, and our own secret key."""

    server_public_file: Path
    secret_key_file: Path


def generate_keys(directory: Path, name: str) -> tuple[Path, Path]:
    """Write ``<name>.key`` (public) and ``<name>.key_secret`` (mode 0600) into directory.

    Returns:
        (public_file, secret_file). Existing files are never overwritten (ConfigError).
    """
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    for p in (public, secret):
        if p.exists():
            raise ConfigError(f"{p}: already exists; remove it or choose another name")
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # create_certificates honours the umask; writing into a private temporary folder
        # means the secret is never readable by others, even for a moment.
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            tmp_public, tmp_secret = zmq.auth.create_certificates(tmp, name)
            os.chmod(tmp_secret, 0o600)
            os.chmod(tmp_public, 0o644)
            os.rename(tmp_secret, secret)
            os.rename(tmp_public, public)
    except OSError as e:
        raise ConfigError(f"{directory}: cannot write CURVE keys ({e})") from e
    return public, secret


def _read(path: Path, what: str, kind: str) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{what}: {path}: cannot read a CURVE {kind} key file ({e})") from e


def _public_key(path: Path, what: str) -> bytes:
    return _read(path, what, "public")[0]


def _key_pair(path: Path, what: str) -> tuple[bytes, bytes]:
    public_key, secret_key = _read(path, what, "secret")
    if not secret_key:
        raise ConfigError(f"{what}: {path}: not a CURVE secret key file")
    return public_key, secret_key


def _set_keys(sock: zmq.Socket[bytes], what: str, path: Path,
              opts: dict[int, bytes | int]) -> None:
    if not zmq.has("curve"):
        raise ConfigError(f"{what}: this libzmq was built without CURVE support")
    try:
        for opt, value in opts.items():
            sock.setsockopt(opt, value)
    except zmq.ZMQError as e:  # a malformed key (wrong length, not Z85)
        raise ConfigError(f"{what}: {path}: invalid CURVE key ({e})") from e


def apply_server(sock: zmq.Socket[bytes], cfg: CurveServer) -> None:
    """Make sock a CURVE server; call before bind()."""
    what = "publish.curve_secret_key"
    public_key, secret_key = _key_pair(cfg.secret_key_file, what)
    _set_keys(sock, what, cfg.secret_key_file, {
        zmq.CURVE_SERVER: 1,
        zmq.CURVE_PUBLICKEY: public_key,
        zmq.CURVE_SECRETKEY: secret_key,
    })


def apply_client(sock: zmq.Socket[bytes], cfg: CurveClient) -> None:
    """Make sock a CURVE client of the server whose public key is given; call before connect()."""
    server_key = _public_key(cfg.server_public_file, "CURVE server public key")
    what = "CURVE client secret key"
    public_key, secret_key = _key_pair(cfg.secret_key_file, what)
    _set_keys(sock, what, cfg.secret_key_file, {
        zmq.CURVE_SERVERKEY: server_key,
        zmq.CURVE_PUBLICKEY: public_key,
        zmq.CURVE_SECRETKEY: secret_key,
    })


def subscriber_socket(
    ctx: zmq.Context[zmq.Socket[bytes]],
    endpoint: str,
    topics: Iterable[str],
    curve: CurveClient | None,
) -> zmq.Socket[bytes]:
    """A connected SUB socket (linger 0), with CURVE when curve is given."""
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if curve is not None:
            apply_client(sock, curve)
        for t in topics:
            sock.setsockopt(zmq.SUBSCRIBE, t.encode())
        sock.connect(endpoint)
    except BaseException:
        sock.close()
        raise
    return sock


REJECT_LOG_INTERVAL_S = 60.0  # at most one log line per peer address this often


class _LoggingAuthenticator(ThreadAuthenticator):
    """pyzmq's authenticator, which logs refusals only at debug level: log each peer address
    refused, at most once per REJECT_LOG_INTERVAL_S, with how many refusals were not logged."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], *, log: logging.Logger,
                 interval_s: float = REJECT_LOG_INTERVAL_S) -> None:
        super().__init__(context, log=log)
        self.interval_s = interval_s
        self.rejected = 0
        self._address = ""
        self._last: dict[str, tuple[float, int]] = {}  # address -> (last logged, suppressed)

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self._address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)

    def _send_zap_reply(self, request_id: bytes, status_code: bytes, status_text: bytes,
                        user_id: str = "anonymous") -> None:
        if status_code != b"200":
            self._rejected(self._address, status_text.decode("utf-8", "replace"))
        super()._send_zap_reply(request_id, status_code, status_text, user_id)

    def _rejected(self, address: str, reason: str) -> None:
        self.rejected += 1
        now = time.monotonic()
        last, suppressed = self._last.get(address, (-1e18, 0))
        if now - last < self.interval_s:
            self._last[address] = (last, suppressed + 1)
            return
        if len(self._last) >= 4096:  # many addresses: forget those not seen for a while
            self._last = {a: v for a, v in self._last.items() if now - v[0] < self.interval_s}
        self._last[address] = (now, 0)
        more = f" ({suppressed} more since the last line)" if suppressed else ""
        log.warning("CURVE: refused a client from %s: %s%s", address or "?", reason, more)


def raise_open_files_limit() -> tuple[int, int]:
    """Raise this process's soft limit on open files to its hard limit; (old, new) soft.

    Every ZeroMQ peer, metrics connection, layer file and SQLite handle is a descriptor; the
    usual soft limit of 1024 was used up by 1,500 idle connections to the state endpoint,
    and layers failed with "Too many open files" meanwhile.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20) if soft != resource.RLIM_INFINITY else soft
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, hard, e)
            return soft, soft
        log.info("open files limit raised from %d to %d", soft, hard)
        return soft, hard
    return soft, soft


class ServerAuth:
    """The ZAP handler of one zmq.Context: only clients whose public key is in the folder.

    Start it before binding any CURVE server socket on that context: without a ZAP handler
    libzmq lets every client with a well-formed key in. Keys are read once, at start().
    """

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], authorized_dir: Path) -> None:
        self.context = context
        self.authorized_dir = authorized_dir
        self._auth: _LoggingAuthenticator | None = None

    def start(self) -> None:
        what = f"publish.curve_authorized_dir: {self.authorized_dir}"
        if not self.authorized_dir.is_dir():
            raise ConfigError(f"{what}: not a folder")
        keys = sorted(self.authorized_dir.glob("*.key"))
        if not keys:
            raise ConfigError(f"{what}: holds no client public keys (*.key); "
                              "copy each client's <name>.key there")
        for k in keys:  # configure_curve only logs a bad file and then denies everyone
            _public_key(k, "publish.curve_authorized_dir")
        auth = _LoggingAuthenticator(self.context, log=log.getChild("zap"))
        # No allow()/deny(): the client's IP address lets nobody in, only a listed key does.
        auth.configure_curve(domain="*", location=str(self.authorized_dir))
        auth.start()
        self._auth = auth
        log.info("CURVE: %d authorized client key(s) in %s", len(keys), self.authorized_dir)

    @property
    def alive(self) -> bool:
        """The ZAP thread is up (or never started): without it no CURVE client gets in."""
        return self._auth is None or self._auth.is_alive()

    @property
    def rejected(self) -> int:
        return self._auth.rejected if self._auth is not None else 0

    def stop(self) -> None:
        """Idempotent."""
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def __enter__(self) -> ServerAuth:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
