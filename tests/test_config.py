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


@pytest.mark.stack
def test_settings_shared_on_the_cluster_carry_no_secrets(stack_base, ray_session) -> None:
    """Serve's args and Ray Train's loop config are logged and persisted: the secrets travel
    through the cluster's internal KV instead, and come back whole."""
    import json

    from chatreid.cluster import share, unshare

    settings = stack_base.model_copy(deep=True)
    settings.serve.api_key, settings.kafka.sasl_password = "key-123", "kafka-456"
    shared = share(settings, "test-config")
    text = json.dumps(shared)
    assert all(secret not in text for secret in ("key-123", "kafka-456",
                                                 settings.s3.secret_key))
    assert unshare(shared) == settings
    assert unshare(None) == Settings()  # the portable config: the process's own environment
