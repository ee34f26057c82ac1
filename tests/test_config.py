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


# -- one source of configuration ------------------------------------------------------------------
def test_every_setting_is_described() -> None:
    from chatreid.config import setting_paths
    from chatreid.config_reference import field_info

    paths = setting_paths()
    assert len(paths) > 100
    vague = [".".join(p) for p in paths if len((field_info(p).description or "").split()) < 3]
    assert not vague, f"settings without a description (what, unit, when to change): {vague}"


def test_secrets_are_secret_types_and_never_shown() -> None:
    import json
    import re

    from pydantic import SecretStr

    from chatreid.config import secret_paths, setting_paths

    # a setting named like a credential is a SecretStr (key_prefix is a storage prefix)
    named = {p for p in setting_paths()
             if re.search(r"(key|password|token|secret)$", p[-1]) and p[-1] != "key_prefix"}
    assert named == set(secret_paths()), named ^ set(secret_paths())
    assert {("s3", "access_key"), ("s3", "secret_key"), ("serve", "api_key"),
            ("ray", "auth_token"), ("kafka", "sasl_password")} <= named
    settings = Settings(_env_file=None)
    values = {}
    for group, name in secret_paths():
        values[(group, name)] = f"very-secret-{group}-{name}"
        setattr(getattr(settings, group), name, values[(group, name)])  # a plain str ...
        assert isinstance(getattr(getattr(settings, group), name), SecretStr)  # ... kept secret
    shown = repr(settings) + str(settings) + settings.model_dump_json() + json.dumps(
        settings.model_dump(mode="json"))
    assert not [v for v in values.values() if v in shown]
    assert settings.serve.api_key.get_secret_value() == values[("serve", "api_key")]


def test_generated_reference_and_env_example_are_current() -> None:
    from chatreid.config_reference import stale

    assert stale() == [], ("stale, regenerate with `python -m chatreid.config_reference`: "
                           f"{stale()}")


def test_staleness_check_has_teeth(monkeypatch, tmp_path) -> None:
    import chatreid.config_reference as ref
    from chatreid.config import ServeSettings, env_name, setting_paths

    doc, env = tmp_path / "configuration.md", tmp_path / ".env.example"
    doc.write_text(ref.DOC.read_text())
    env.write_text(ref.ENV_EXAMPLE.read_text())
    monkeypatch.setattr(ref, "DOC", doc)
    monkeypatch.setattr(ref, "ENV_EXAMPLE", env)
    monkeypatch.setattr(ref, "ROOT", tmp_path)
    assert ref.stale() == []
    text = ref.render_reference()
    assert all(f"`{env_name(*p)}`" in text for p in setting_paths())
    assert "🔒 `CHATREID_S3__SECRET_KEY`" in text and "🔒 `CHATREID_SITE`" not in text
    # a changed description makes both files stale
    field = ServeSettings.model_fields["rationale_top"]
    monkeypatch.setattr(field, "description", "a description nobody regenerated")
    assert sorted(ref.stale()) == [".env.example", "configuration.md"]


def test_helm_mapping_is_read_from_the_chart() -> None:
    from chatreid.config_reference import helm_mapping

    helm = helm_mapping()
    assert helm["CHATREID_KAFKA__PARTITIONS"] == "`kafka.partitions`"
    assert (helm["CHATREID_SERVE__RERANK_MAX_REPLICAS"]
            == "`retrieval.rerankAutoscaling.maxReplicas`")
    assert helm["CHATREID_S3__SECRET_KEY"] == "Secret (key `s3.secretKeyKey`)"
    assert helm["CHATREID_EMBEDDER__WEIGHTS"] == "`embedder.weights`"  # {{ with ... }}
    assert len(helm) >= 45


def test_deployment_files_name_only_real_settings() -> None:
    """Every CHATREID_* name in the chart, compose, .env.example, the docs and the code is a
    setting (or one of the compose-only variables), and every compose-only variable is used."""
    import re
    from pathlib import Path

    from chatreid.config import COMPOSE_VARIABLES, known_variables
    from chatreid.config_reference import helm_mapping, unknown_names

    root = Path(__file__).resolve().parents[1]
    files = [root / ".env.example", root / "docker-compose.yml", root / "Dockerfile",
             root / "README.md"]
    for folder, pattern in (("helm", "*"), ("deploy", "*"), ("docs", "*.md"),
                            ("chatreid", "*.py"), ("services", "*.py"), ("ray_jobs", "*.py")):
        files += [p for p in (root / folder).rglob(pattern) if p.is_file()]
    wrong = {str(p.relative_to(root)): names for p in files if p.exists()
             if (names := unknown_names(p.read_text(errors="replace")))}
    assert not wrong, f"no such setting: {wrong}"
    assert set(helm_mapping()) <= known_variables() - COMPOSE_VARIABLES
    compose = (root / "docker-compose.yml").read_text()
    unused = {v for v in COMPOSE_VARIABLES if not re.search(rf"\${{{v}\b", compose)}
    assert not unused, f"COMPOSE_VARIABLES no longer in docker-compose.yml: {unused}"
    assert unknown_names("CHATREID_SERVE__API_KYE CHATREID_SITE") == {"CHATREID_SERVE__API_KYE"}


def test_unknown_variables_are_warned_about(checkout, monkeypatch, caplog) -> None:
    import logging

    monkeypatch.setenv("CHATREID_SERVE__RATE_PER_MINUT", "5")  # a typo, in the environment
    monkeypatch.setenv("CHATREID_IMAGE", "chatreid:1")  # compose's: known
    (checkout / ".env").write_text("CHATREID_KAFKA__PARTITONS=3\nCHATREID_SITE=s1\n")
    with caplog.at_level(logging.WARNING, logger="chatreid.config"):
        settings = Settings()
    assert settings.site == "s1" and settings.kafka.partitions == 6  # the typo is not applied
    text = caplog.text
    assert "CHATREID_SERVE__RATE_PER_MINUT in the environment" in text
    assert "CHATREID_KAFKA__PARTITONS in .env" in text
    assert "did you mean CHATREID_KAFKA__PARTITIONS?" in text
    assert "CHATREID_IMAGE" not in text and "CHATREID_SITE " not in text
