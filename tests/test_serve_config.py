"""The retrieval app's deploy config: what `chatreid serve`, compose and KubeRay deploy."""

from __future__ import annotations

from ray.serve.schema import ServeDeploySchema

from chatreid.config import Settings
from chatreid.retrieval import ModelSpec
from chatreid.services.retrieval.app import deploy_config


def _rerank(config: dict) -> dict:
    return next(d for d in config["applications"][0]["deployments"] if d["name"] == "Rerank")


def test_replicas_and_autoscaling_come_from_settings() -> None:
    s = Settings()
    s.serve.rerank_replicas = 3
    fixed = deploy_config(s, ModelSpec.of_base("tiny"))
    ServeDeploySchema.model_validate(fixed)
    assert _rerank(fixed)["num_replicas"] == 3 and "autoscaling_config" not in _rerank(fixed)

    s.serve.rerank_autoscaling = True
    s.serve.rerank_min_replicas, s.serve.rerank_max_replicas = 1, 4
    scaled = ServeDeploySchema.model_validate(deploy_config(s, ModelSpec.of_base("tiny")))
    rerank = next(d for d in scaled.applications[0].deployments if d.name == "Rerank")
    assert rerank.autoscaling_config["min_replicas"] == 1
    assert rerank.autoscaling_config["max_replicas"] == 4


def test_the_model_travels_in_user_config_only() -> None:
    """A rollout changes nothing but the rerank user_config, so Serve reconfigures in place."""
    s = Settings()
    a = deploy_config(s, ModelSpec.of_base("tiny"))
    b = deploy_config(s, ModelSpec.of_base("offline-default"))
    assert _rerank(a)["user_config"] != _rerank(b)["user_config"]
    _rerank(a).pop("user_config")
    _rerank(b).pop("user_config")
    assert a == b
    assert deploy_config(s, None)["applications"][0]["deployments"][2]["user_config"] == {
        "model": None}


def test_the_portable_config_carries_no_secret_and_a_model_reference(monkeypatch) -> None:
    """What `chatreid serve --print-config` prints and the Helm chart's RayService renders:
    settings come from each pod's environment, the replicas resolve the model themselves."""
    from chatreid.services.retrieval.app import build_app
    from chatreid.services.retrieval.deployments import model_spec

    s = Settings()
    s.serve.model = "tiny"
    portable = deploy_config(s, portable=True)
    ServeDeploySchema.model_validate(portable)
    assert portable["applications"][0]["args"] == {}
    assert s.s3.secret_key not in str(portable)
    assert _rerank(portable)["user_config"] == {"model": "tiny"}

    spec = model_spec(s, "tiny")  # what a replica does with the reference
    assert spec == ModelSpec.of_base("tiny")
    assert model_spec(s, spec.model_dump(mode="json")) == spec  # the local config's form
    assert model_spec(s, None) is None

    from chatreid.cluster import unshare

    monkeypatch.setenv("CHATREID_SITE", "from-the-pod")
    app = build_app({})  # no settings in args: each replica reads its own environment
    assert app._bound_deployment.init_args[-1] is None
    assert unshare(None).site == "from-the-pod"

    s.serve.api_key = "the-bootstrap-key"  # the local config carries no secret either
    local = str(deploy_config(s, ModelSpec.of_base("tiny")))
    assert "the-bootstrap-key" not in local and s.s3.secret_key not in local
