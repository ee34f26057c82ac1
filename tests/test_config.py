"""Settings from the environment: what compose and the Helm chart set reaches every client."""

from __future__ import annotations

import pytest

from chatreid.config import Settings


def test_kafka_credentials_reach_every_client(monkeypatch) -> None:
    from chatreid.bus import make_consumer

    plain = Settings().kafka.client_options()
    assert plain == {"bootstrap_servers": "127.0.0.1:9092", "security_protocol": "PLAINTEXT"}

    monkeypatch.setenv("CHATREID_KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("CHATREID_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("CHATREID_KAFKA__SASL_USERNAME", "reid")
    monkeypatch.setenv("CHATREID_KAFKA__SASL_PASSWORD", "s3cret")
    kafka = Settings().kafka
    assert kafka.client_options() == {
        "bootstrap_servers": "127.0.0.1:9092", "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "reid",
        "sasl_plain_password": "s3cret"}
    # kafka-python accepts them (it checks the SASL options when the client is built).
    consumer = make_consumer(kafka, None, bootstrap_servers=[], api_version=(2, 8))
    assert consumer.config["sasl_mechanism"] == "SCRAM-SHA-512"
    consumer.close()


def test_a_misspelt_security_protocol_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("CHATREID_KAFKA__SECURITY_PROTOCOL", "SASL")
    with pytest.raises(ValueError, match="security_protocol"):
        Settings()
