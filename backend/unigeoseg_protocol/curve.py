"""CURVE key material of a client (no zmq import, so that settings code can build it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CurveClientKeys:
    """Z85-encoded CURVE keys: the server's public key and this client's key pair."""

    server_public: bytes
    public: bytes
    secret: bytes
