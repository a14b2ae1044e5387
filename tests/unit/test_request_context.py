"""Who a request comes from: trusted proxies, X-Forwarded-For, IPv6 networks; log context."""

from __future__ import annotations

import io
import json
import logging

import pytest

from kiln.api.principal import address_group, client_address, parse_networks
from kiln.config import ConfigError, LoggingConfig, load_config
from kiln.logconfig import log_context, setup_logging

TRUSTED = parse_networks(["10.0.0.0/8", "fd00::/8"])


@pytest.mark.parametrize(("peer", "forwarded", "expected"), [
    # no proxy trusted, or the peer is not one: X-Forwarded-For is anyone's to forge
    ("198.51.100.7", "1.2.3.4", "198.51.100.7"),
    ("198.51.100.7", None, "198.51.100.7"),
    # behind a trusted proxy: the hop it saw
    ("10.0.0.2", "203.0.113.9", "203.0.113.9"),
    # a forged entry in front of the real hop is ignored
    ("10.0.0.2", "1.2.3.4, 203.0.113.9", "203.0.113.9"),
    # two trusted proxies in a row
    ("10.0.0.2", "203.0.113.9, 10.1.1.1", "203.0.113.9"),
    # garbage stops the walk at the last believable hop
    ("10.0.0.2", "203.0.113.9, not-an-ip", "10.0.0.2"),
    ("fd00::1", "2001:db8::5", "2001:db8::5"),
    ("::ffff:198.51.100.7", None, "198.51.100.7"),
])
def test_client_address(peer: str, forwarded: str | None, expected: str) -> None:
    assert client_address(peer, forwarded, TRUSTED) == expected


def test_untrusted_peers_cannot_claim_another_address() -> None:
    assert client_address("203.0.113.9", "10.0.0.2", []) == "203.0.113.9"


def test_ipv6_clients_count_per_64() -> None:
    assert address_group("2001:db8:1:2::10") == address_group("2001:db8:1:2:ffff::1")
    assert address_group("2001:db8:1:2::10") == "2001:db8:1:2::/64"
    assert address_group("2001:db8:1:3::10") != address_group("2001:db8:1:2::10")
    assert address_group("198.51.100.7") == "198.51.100.7"


def test_trusted_proxies_must_be_networks() -> None:
    with pytest.raises(ConfigError, match="api.trusted_proxies"):
        load_config("/dev/null", env={"KILN_API__TRUSTED_PROXIES": "[10.0.0.0/8, nope]"})
    config = load_config("/dev/null", env={"KILN_API__TRUSTED_PROXIES": "[10.0.0.0/8]"})
    assert config.api.trusted_proxies == ["10.0.0.0/8"]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_log_lines_carry_the_bound_context(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        setup_logging(LoggingConfig(format=fmt), process="test")
        log = logging.getLogger("kiln.test")
        with log_context(request_id="req-1"):
            log.info("inside")
            log.info("explicit", extra={"build_key": "b" * 64})
        log.info("outside")
    finally:
        root.handlers[:], root.level = saved
    lines = stream.getvalue().splitlines()
    if fmt == "json":
        records = [json.loads(line) for line in lines]
        assert records[0]["request_id"] == "req-1"
        assert records[1]["build_key"] == "b" * 64 and records[1]["request_id"] == "req-1"
        assert "request_id" not in records[2]
    else:
        assert lines[0].endswith("inside [request_id=req-1]")
        assert lines[1].endswith(f"explicit [request_id=req-1 build_key={'b' * 64}]")
        assert lines[2].endswith("outside")


def test_gunicorn_lines_take_kiln_format(monkeypatch: pytest.MonkeyPatch) -> None:
    from gunicorn.config import Config as GunicornConfig

    from kiln.logconfig import GunicornLogger

    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    monkeypatch.setenv("CONFIG_PATH", "/dev/null")
    monkeypatch.setenv("KILN_LOGGING__FORMAT", "json")
    cfg = GunicornConfig()
    cfg.set("accesslog", "-")
    logger = GunicornLogger(cfg)
    try:
        logger.info("Booting worker with pid: %s", 42)
        atoms = logger.atoms_wrapper_class({"h": "203.0.113.9", "r": "GET /healthz HTTP/1.1",
                                            "s": "200", "{x-request-id}o": "rid-9"})
        logger.access_log.info(cfg.access_log_format, atoms)
    finally:
        for log in (logger.error_log, logger.access_log):
            log.handlers.clear()
    boot, access = (json.loads(line) for line in stream.getvalue().splitlines())
    assert boot["message"] == "Booting worker with pid: 42" and boot["process_name"] == "api"
    assert access["request_id"] == "rid-9" and "GET /healthz" in access["message"]
