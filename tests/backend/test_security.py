"""Loopback by default; anything else only with CURVE authentication, which is enforced."""

from __future__ import annotations

import pytest
import zmq
import zmq.auth

from unigeoseg_backend.errors import InvalidInputError
from unigeoseg_backend.service.config import ServiceConfig, is_local_address
from unigeoseg_protocol import RequestTimeout
from unigeoseg_protocol.client import Client, CurveClientKeys


@pytest.mark.parametrize("address, local", [
    ("tcp://127.0.0.1:5557", True), ("tcp://127.8.9.10:1", True), ("tcp://localhost:5557", True),
    ("tcp://[::1]:5557", True), ("ipc:///tmp/unigeoseg.sock", True), ("inproc://x", True),
    ("tcp://0.0.0.0:5557", False), ("tcp://*:5557", False), ("tcp://192.168.1.10:5557", False),
    ("tcp://eth0:5557", False), ("tcp://example.org:5557", False), ("udp://127.0.0.1:1", False),
])
def test_only_loopback_ipc_and_inproc_count_as_local(address, local):
    assert is_local_address(address) is local


def test_non_loopback_needs_curve_keys(tmp_path):
    with pytest.raises(InvalidInputError, match="refusing to listen"):
        ServiceConfig(address="tcp://0.0.0.0:5557").validate()
    server_public, server_secret = zmq.auth.create_certificates(tmp_path, "server")
    config = ServiceConfig().with_overrides(address="tcp://0.0.0.0:5557",
                                            curve_server_secret_file=server_secret,
                                            curve_authorized_clients_dir=tmp_path)
    assert config.curve_enabled


def test_curve_backend_serves_authorised_clients_only(tmp_path, backend_factory,
                                                      tiny_sam_checkpoint):
    keys, authorised, strangers = (tmp_path / n for n in ("server", "authorised", "strangers"))
    for folder in (keys, authorised, strangers):
        folder.mkdir()
    server_public_file, server_secret_file = zmq.auth.create_certificates(keys, "server")
    client_public_file, client_secret_file = zmq.auth.create_certificates(authorised, "analyst")
    _, stranger_secret_file = zmq.auth.create_certificates(strangers, "stranger")
    config = tmp_path / "serve.toml"
    config.write_text(f'curve_server_secret_file = "{server_secret_file}"\n'
                      f'curve_authorized_clients_dir = "{authorised}"\n')
    backend = backend_factory("--config", str(config), "--sam-type", "tiny",
                              "--sam-checkpoint", str(tiny_sam_checkpoint))
    server_public, _ = zmq.auth.load_certificate(server_public_file)

    def keys_from(secret_file):
        public, secret = zmq.auth.load_certificate(secret_file)
        return CurveClientKeys(server_public=server_public, public=public, secret=secret)

    with Client(backend.address, curve=keys_from(client_secret_file)) as client:
        hello = client.hello()
        assert hello.authenticated is True
    with Client(backend.address, curve=keys_from(stranger_secret_file)) as client:
        with pytest.raises(RequestTimeout):
            client.hello(timeout_s=2.0)
    with Client(backend.address) as client:  # no keys at all
        with pytest.raises(RequestTimeout):
            client.hello(timeout_s=2.0)
