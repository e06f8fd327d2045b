"""CURVE keys, and a CURVE PUB endpoint that only authorized subscribers can read (real sockets)."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest
import zmq

from monitor.daemon.security import (
    CurveClient,
    CurveServer,
    ServerAuth,
    apply_client,
    apply_server,
    generate_keys,
    subscriber_socket,
)
from monitor.errors import ConfigError
from tests.conftest import free_endpoint


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    """server, alice (authorized) and mallory (not); alice's public key in authorized/."""
    out = {n: generate_keys(tmp_path / "keys", n) for n in ("server", "alice", "mallory")}
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    (authorized / "alice.key").write_bytes(out["alice"][0].read_bytes())
    return out


def server_cfg(keys: dict[str, tuple[Path, Path]]) -> CurveServer:
    return CurveServer(keys["server"][1], keys["server"][1].parent.parent / "authorized")


def client_cfg(keys: dict[str, tuple[Path, Path]], name: str) -> CurveClient:
    return CurveClient(keys["server"][0], keys[name][1])


def test_generate_keys_private_secret_and_no_overwrite(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "keys"
    public, secret = generate_keys(folder, "server")
    assert (public.name, secret.name) == ("server.key", "server.key_secret")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert "secret-key" not in public.read_text() and "secret-key" in secret.read_text()
    assert sorted(p.name for p in folder.iterdir()) == ["server.key", "server.key_secret"]
    before = secret.read_bytes()
    with pytest.raises(ConfigError, match=r"server\.key.*already exists"):
        generate_keys(folder, "server")
    assert secret.read_bytes() == before


def test_missing_or_wrong_key_files_name_the_file(
        tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.PUB)
    try:
        missing = tmp_path / "nope.key_secret"
        with pytest.raises(ConfigError, match=rf"publish\.curve_secret_key: {missing}"):
            apply_server(sock, CurveServer(missing, tmp_path))
        public = keys["server"][0]
        with pytest.raises(ConfigError, match=rf"{public}: not a CURVE secret key file"):
            apply_server(sock, CurveServer(public, tmp_path))
        with pytest.raises(ConfigError, match=str(missing)):
            apply_client(sock, CurveClient(missing, keys["alice"][1]))
        with pytest.raises(ConfigError, match=str(missing)):
            apply_client(sock, CurveClient(keys["server"][0], missing))
    finally:
        sock.close(linger=0)
        ctx.term()


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "not a folder"),
    (lambda d: d.mkdir(), "no client public keys"),
    (lambda d: (d.mkdir(), (d / "bad.key").write_text("junk")), "bad.key"),
])
def test_server_auth_needs_a_folder_of_keys(tmp_path: Path, setup, message: str) -> None:
    folder = tmp_path / "authorized"
    setup(folder)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        with pytest.raises(ConfigError, match=rf"publish\.curve_authorized_dir.*{message}"):
            ServerAuth(ctx, folder).start()
    finally:
        ctx.term()


def test_curve_pub_delivers_only_to_authorized_keys(keys: dict[str, tuple[Path, Path]]) -> None:
    endpoint = free_endpoint()
    server_ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    client_ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    auth = ServerAuth(server_ctx, server_cfg(keys).authorized_dir)
    auth.start()
    pub = server_ctx.socket(zmq.PUB)
    subs = {}
    try:
        apply_server(pub, server_cfg(keys))
        pub.bind(endpoint)
        subs = {
            "alice": subscriber_socket(client_ctx, endpoint, ["layer"], client_cfg(keys, "alice")),
            "plain": subscriber_socket(client_ctx, endpoint, [""], None),
            "mallory": subscriber_socket(client_ctx, endpoint, [""],
                                         client_cfg(keys, "mallory")),
        }
        got: dict[str, list[bytes]] = {name: [] for name in subs}

        def drain() -> None:
            for name, s in subs.items():
                while s.poll(0):
                    got[name].append(s.recv_multipart()[1])

        deadline = time.monotonic() + 10
        while not got["alice"]:  # alice's handshake is done once she hears anything
            assert time.monotonic() < deadline, "authorized subscriber never connected"
            pub.send_multipart([b"layer", b"hello"])
            time.sleep(0.05)
            drain()
        for i in range(20):
            pub.send_multipart([b"layer", str(i).encode()])
            time.sleep(0.05)
            drain()
        for _ in range(20):  # let anything still in flight arrive
            time.sleep(0.01)
            drain()
        assert got["alice"][-20:] == [str(i).encode() for i in range(20)]
        assert got["plain"] == [] and got["mallory"] == []
    finally:
        for s in subs.values():
            s.close(linger=0)
        pub.close(linger=0)
        auth.stop()
        auth.stop()  # idempotent
        server_ctx.term()
        client_ctx.term()
