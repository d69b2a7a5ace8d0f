"""CURVE keys for a backend that requires authentication (a backend beyond this machine).

The backend refuses connections from other hosts unless CURVE is configured
(``curve_server_secret_file`` and ``curve_authorized_clients_dir`` in its TOML). The analyst
then needs the backend's public certificate and a certificate of their own whose public half
sits in the backend's authorised folder; the plugin's settings name both files (ZeroMQ
certificate files, as ``zmq.auth.create_certificates`` writes them).
"""

from __future__ import annotations

from ..unigeoseg_protocol.curve import CurveClientKeys
from .settings import PluginSettings


class CurveKeyError(ValueError):
    """The settings name CURVE key files that cannot be used (the message says why)."""


def curve_keys(settings: PluginSettings) -> CurveClientKeys | None:
    """The keys the settings name, or None when they name none.

    Raises:
        CurveKeyError: only one file is set, a file is missing or is no certificate, or the
            analyst's file holds no secret key.
    """
    server_file = settings.curve_server_public_file.strip()
    client_file = settings.curve_client_secret_file.strip()
    if not server_file and not client_file:
        return None
    if not server_file or not client_file:
        raise CurveKeyError("CURVE authentication needs both the backend's public key file and "
                            "your secret key file")
    server_public, _ = _load(server_file, "the backend's public key")
    public, secret = _load(client_file, "your secret key")
    if secret is None:
        raise CurveKeyError(f"{client_file} holds no secret key: choose your own *.key_secret "
                            f"certificate, not a public one")
    return CurveClientKeys(server_public=server_public, public=public, secret=secret)


def _load(path: str, what: str) -> tuple[bytes, bytes | None]:
    import zmq.auth  # pyzmq is imported only once the plugin connects

    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"cannot read {what} from {path}: {exc}") from exc
