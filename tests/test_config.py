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
                                                 settings.s3.secret_key.get_secret_value()))
    assert unshare(shared) == settings
    assert unshare(None) == Settings()  # the portable config: the process's own environment


# -- the local stack's generated secrets ---------------------------------------------------------
_SECRETS = ("CHATREID_S3__ACCESS_KEY", "CHATREID_S3__SECRET_KEY", "CHATREID_SERVE__API_KEY",
            "CHATREID_STACK__DATA_DIR")


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A fresh working directory with none of the secrets in the environment."""
    for var in _SECRETS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_object_store_keys_have_no_default_and_say_how_to_get_them(checkout) -> None:
    from chatreid.config import MissingCredentials

    s3 = Settings().s3
    assert s3.access_key is None and s3.secret_key is None  # was chatreid/chatreid-secret
    with pytest.raises(MissingCredentials, match=r"CHATREID_S3__ACCESS_KEY.*chatreid up"):
        s3.credentials()


def test_generated_credentials_are_owner_only_and_read_after_env_and_dotenv(
        checkout, monkeypatch) -> None:
    import stat

    from chatreid.app.stack import LocalStack

    settings = Settings()
    new = LocalStack(settings).ensure_credentials(api_key=True)
    assert set(new) == {"CHATREID_S3__ACCESS_KEY", "CHATREID_S3__SECRET_KEY",
                        "CHATREID_SERVE__API_KEY"}
    assert len(set(new.values())) == 3 and all(len(v) >= 16 for v in new.values())
    creds = checkout / ".chatreid" / "credentials.env"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    assert stat.S_IMODE(creds.parent.stat().st_mode) == 0o700
    assert settings.s3.credentials() == (new["CHATREID_S3__ACCESS_KEY"],
                                         new["CHATREID_S3__SECRET_KEY"])

    again = Settings()  # a later process reads them back, and nothing is generated twice
    assert again.serve.api_key.get_secret_value() == new["CHATREID_SERVE__API_KEY"]
    assert LocalStack(again).ensure_credentials(api_key=True) == {}

    # what is configured wins: .env over the generated file, the environment over both
    (checkout / ".env").write_text("CHATREID_SERVE__API_KEY=from-dotenv\n")
    assert Settings().serve.api_key.get_secret_value() == "from-dotenv"
    monkeypatch.setenv("CHATREID_SERVE__API_KEY", "from-env")
    assert Settings().serve.api_key.get_secret_value() == "from-env"
    # still from the file
    assert Settings().s3.access_key.get_secret_value() == new["CHATREID_S3__ACCESS_KEY"]


def test_existing_credentials_are_kept_and_configured_ones_not_generated(
        checkout, monkeypatch) -> None:
    """The shared stack's file (keys the running object store was started with) is appended
    to, never rewritten; a key set in the environment is not generated into it."""
    from chatreid.app.stack import LocalStack

    creds = checkout / ".chatreid" / "credentials.env"
    creds.parent.mkdir()
    existing = "CHATREID_S3__ACCESS_KEY=chatreid\nCHATREID_S3__SECRET_KEY=chatreid-secret"
    creds.write_text(existing)  # no trailing newline
    monkeypatch.setenv("CHATREID_SERVE__API_KEY", "configured")
    assert LocalStack(Settings()).ensure_credentials(api_key=True) == {}
    assert creds.read_text() == existing

    monkeypatch.delenv("CHATREID_SERVE__API_KEY")
    settings = Settings()
    new = LocalStack(settings).ensure_credentials(api_key=True)
    assert list(new) == ["CHATREID_SERVE__API_KEY"]
    assert creds.read_text().startswith(existing + "\n")
    assert settings.s3.credentials() == ("chatreid", "chatreid-secret")


def test_a_non_default_data_dir_keeps_its_credentials_there(checkout, monkeypatch) -> None:
    from chatreid.app.stack import LocalStack

    monkeypatch.setenv("CHATREID_STACK__DATA_DIR", str(checkout / "elsewhere"))
    new = LocalStack(Settings()).ensure_credentials()
    assert (checkout / "elsewhere" / "credentials.env").exists()
    assert not (checkout / ".chatreid").exists()
    assert Settings().s3.secret_key.get_secret_value() == new["CHATREID_S3__SECRET_KEY"]
