"""Service settings: defaults, a TOML file (``--config``) and command-line overrides."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import tomllib

from unigeoseg_protocol.client import DEFAULT_ADDRESS
from unigeoseg_protocol.messages import DEFAULT_MAX_MESSAGE_BYTES

from ..errors import InvalidInputError


@dataclass(frozen=True)
class ServiceConfig:
    """Everything ``unigeoseg serve`` can be told (docs/protocol.md explains each)."""

    address: str = DEFAULT_ADDRESS
    device: str = "auto"                      # auto | cpu | cuda | cuda:N
    sam_checkpoint: Path | None = None
    sam_type: str = "vit_b"
    model: str | None = None                  # UniGeoSeg model directory or cached name
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    queue_size: int = 16                      # requests waiting for the worker
    request_timeout_s: float = 120.0          # used when a request names no timeout
    max_request_timeout_s: float = 3600.0
    image_cache_bytes: int = 2 << 30
    embedding_cache_bytes: int = 2 << 30
    # CURVE authentication: this server's key pair (a zmq certificate file with its secret key)
    # and a folder of the clients' public certificates that may connect.
    curve_server_secret_file: Path | None = None
    curve_authorized_clients_dir: Path | None = None
    log_level: str = "INFO"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_toml(cls, path: Path) -> ServiceConfig:
        """Read a TOML file whose keys are this class's field names."""
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidInputError(f"cannot read config file {path}: {exc}") from exc
        return cls().with_overrides(**data)

    def with_overrides(self, **values: Any) -> ServiceConfig:
        """A copy with the given non-None values set (types coerced, unknown keys refused)."""
        known = {f.name: f for f in fields(self)}
        changes: dict[str, Any] = {}
        for key, value in values.items():
            if value is None:
                continue
            if key not in known or key == "extra":
                raise InvalidInputError(f"unknown setting {key!r}; known: {sorted(known)}")
            if key in ("sam_checkpoint", "curve_server_secret_file",
                       "curve_authorized_clients_dir"):
                value = Path(value).expanduser()
            elif key in ("max_message_bytes", "queue_size", "image_cache_bytes",
                         "embedding_cache_bytes"):
                value = int(value)
            elif key in ("request_timeout_s", "max_request_timeout_s"):
                value = float(value)
            changes[key] = value
        config = replace(self, **changes)
        config.validate()
        return config

    @property
    def curve_enabled(self) -> bool:
        return self.curve_server_secret_file is not None

    def validate(self) -> None:
        if self.queue_size < 1 or self.max_message_bytes < 1024:
            raise InvalidInputError("queue_size must be >= 1 and max_message_bytes >= 1024")
        if self.request_timeout_s <= 0 or self.max_request_timeout_s < self.request_timeout_s:
            raise InvalidInputError("timeouts must be positive, with max >= default")
        if self.curve_enabled != (self.curve_authorized_clients_dir is not None):
            raise InvalidInputError("CURVE needs both curve_server_secret_file and "
                                    "curve_authorized_clients_dir")
        if not is_local_address(self.address) and not self.curve_enabled:
            raise InvalidInputError(
                f"refusing to listen on {self.address}: only loopback and ipc addresses are "
                f"allowed without authentication; configure CURVE keys "
                f"(curve_server_secret_file, curve_authorized_clients_dir) to listen elsewhere")


def is_local_address(address: str) -> bool:
    """True for ``ipc://``, ``inproc://`` and ``tcp://`` on a loopback host."""
    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = urlsplit(f"//{rest}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # '*', interface names and host names are not provably local
        return False
