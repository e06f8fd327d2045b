"""Plant integration: the OPC UA server and the MQTT publisher."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from monitor.config.base import (
    Section,
)

_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


class OpcuaConfig(Section):
    """The OPC UA server: printers, last layers, open alarms, heartbeat; Ack/Mute methods."""

    enabled: bool = Field(False, description="Serve OPC UA.")
    endpoint: str = Field("opc.tcp://127.0.0.1:4840/pbf-monitor",
                          description="opc.tcp://HOST:PORT/PATH the server binds.")
    security_policy: tuple[Literal["None", "Basic256Sha256_Sign",
                                   "Basic256Sha256_SignAndEncrypt"], ...] = Field(
        ("None",), description="Security policies offered (Basic256Sha256 ones need "
        "certificate and private_key)."
    )
    certificate: Path | None = Field(None, description="Server certificate (PEM or DER).")
    private_key: Path | None = Field(None, description="Server private key (PEM or DER).")
    users_file: Path | None = Field(
        None, description="Lines 'user:password'; those users may read and call methods."
    )
    trusted_client_certs_dir: Path | None = Field(
        None, description="Client certificates (*.der, *.pem, *.crt) that log in as users."
    )
    anonymous: Literal["write", "read", "off"] = Field(
        "write", description="What a client without user or certificate may do: call the "
        "methods too (write), browse and read (read), nothing (off)."
    )

    @field_validator("endpoint")
    @classmethod
    def _opc_tcp(cls, value: str) -> str:
        if not re.fullmatch(r"opc\.tcp://[^\s/:]+(:\d{1,5})?(/\S*)?", value):
            raise ValueError(f"expected opc.tcp://HOST:PORT/PATH, got {value!r}")
        return value

    @model_validator(mode="after")
    def _safe(self) -> OpcuaConfig:
        if not self.enabled:
            return self
        host = re.sub(r"^opc\.tcp://", "", self.endpoint).split("/")[0].rsplit(":", 1)[0]
        if host not in _LOOPBACK_HOSTS and self.anonymous == "write":
            raise ValueError(f"endpoint {self.endpoint} is not loopback and anonymous = "
                             "\"write\" would let anyone acknowledge and mute alarms: set "
                             "opcua.anonymous = \"read\" or \"off\" and give users_file or "
                             "trusted_client_certs_dir")
        secure = [p for p in self.security_policy if p != "None"]
        if secure and (self.certificate is None or self.private_key is None):
            raise ValueError(f"security_policy {secure} needs opcua.certificate and "
                             "opcua.private_key")
        return self


class MqttConfig(Section):
    """The MQTT publisher: the ZeroMQ messages, and retained state, on a broker."""

    enabled: bool = Field(False, description="Publish to an MQTT broker.")
    url: str = Field("mqtt://127.0.0.1:1883", description="mqtt://HOST:PORT or mqtts://HOST:PORT.")
    printer: str = Field(
        "default", pattern=r"^[^\s/+#]+$",
        description="Topic level after pbf-monitor/ (pbf-monitor/<printer>/layer, ...)."
    )
    ca_file: Path | None = Field(None, description="CA certificate for mqtts (default: system).")
    cert_file: Path | None = Field(None, description="Client certificate for mqtts.")
    key_file: Path | None = Field(None, description="Client private key for mqtts.")
    username: str = Field("", description="Broker user name; empty = none.")
    password_file: Path | None = Field(None, description="File holding the broker password.")
    client_id: str = Field("", description="MQTT client id; empty = pbf-monitor-<printer>.")
    queue_size: int = Field(
        10_000, ge=1, description="Messages waiting for a slow or absent broker; beyond this "
        "the oldest are dropped, counted and logged."
    )
    keepalive_s: int = Field(30, ge=5, description="MQTT keepalive.")

    @field_validator("url")
    @classmethod
    def _mqtt_url(cls, value: str) -> str:
        if not re.fullmatch(r"mqtts?://[^\s/:]+(:\d{1,5})?/?", value):
            raise ValueError(f"expected mqtt://HOST:PORT or mqtts://HOST:PORT, got {value!r}")
        return value
