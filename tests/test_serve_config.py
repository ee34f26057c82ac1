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
