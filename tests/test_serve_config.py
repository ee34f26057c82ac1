"""The retrieval app's deploy config: what `chatreid serve`, compose and KubeRay deploy."""

from __future__ import annotations

import pytest
from ray.serve.schema import ServeDeploySchema

from chatreid.config import Settings
from chatreid.query import ModelSpec
from services.retrieval.app import deploy_config


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


def test_shard_deployments_come_from_settings() -> None:
    """One shard deploys none; N shards deploy PrefilterShard0..N-1, each with the Prefilter
    tier's replicas, on light CPUs (the local stack, compose) or, with a shard resource (the
    Helm chart's `prefilter` worker group), one unit of it and no CPU."""
    import yaml

    s = Settings()
    names = [d["name"] for d in deploy_config(s, None)["applications"][0]["deployments"]]
    assert names == ["Ingress", "Prefilter", "Rerank"]

    s.index.shards, s.serve.prefilter_replicas = 3, 2
    config = deploy_config(s, None, portable=True)
    ServeDeploySchema.model_validate(config)
    shards = config["applications"][0]["deployments"][2:5]
    assert [d["name"] for d in shards] == ["PrefilterShard0", "PrefilterShard1",
                                           "PrefilterShard2"]
    assert all(d["num_replicas"] == 2 and d["ray_actor_options"] == {"num_cpus": 0.1}
               for d in shards)

    s.serve.prefilter_shard_resource = "prefilter_shard"
    config = deploy_config(s, None, portable=True)
    ServeDeploySchema.model_validate(config)
    shards = config["applications"][0]["deployments"][2:5]
    assert all(d["ray_actor_options"] == {"num_cpus": 0.0, "resources": {"prefilter_shard": 1.0}}
               for d in shards)
    assert "&id" not in yaml.safe_dump(config)  # `--print-config` YAML without anchors


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
    from services.retrieval.app import build_app
    from services.retrieval.deployments import model_spec

    s = Settings()
    s.serve.model = "tiny"
    portable = deploy_config(s, portable=True)
    ServeDeploySchema.model_validate(portable)
    assert portable["applications"][0]["args"] == {}
    assert s.s3.secret_key.get_secret_value() not in str(portable)
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
    assert "the-bootstrap-key" not in local and s.s3.secret_key.get_secret_value() not in local


def test_a_rollout_to_a_local_directory_needs_a_valid_checkpoint(tmp_path) -> None:
    """Any existing directory used to resolve to a model (and roll out, then fail on every
    replica); now each cause is named before anything moves."""
    import json

    from chatreid.checkpoints import MANIFEST, describe
    from chatreid.model import build_model
    from chatreid.model.builder import save_checkpoint
    from chatreid.query.vlm import check_model_dir, resolve_spec

    def resolve(path) -> ModelSpec | None:
        s = Settings()
        s.serve.model = str(path)
        return resolve_spec(s)

    good = save_checkpoint(*build_model("tiny"), tmp_path / "good")
    assert resolve(good) == ModelSpec.of_base(str(good))

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"config\.json"):
        resolve(empty)
    with pytest.raises(ValueError, match=r"config\.json"):
        resolve(tmp_path)  # a directory holding a checkpoint is not one
    (empty / "config.json").write_text('{"model_type": "bert"}')
    for name in ("tokenizer.json", "preprocessor_config.json", "model.safetensors"):
        (empty / name).write_text("{}")
    with pytest.raises(ValueError, match="model_type 'bert'"):
        resolve(empty)
    (empty / "config.json").write_text("not json")
    with pytest.raises(ValueError, match="not a model checkpoint"):
        resolve(empty)
    (good / "model.safetensors").rename(good / "weights.bak")
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        resolve(good)
    (good / "weights.bak").rename(good / "model.safetensors")

    # a pulled checkpoint carries its manifest: every file must still match it
    files = [f.model_dump() for f in describe(good)]
    (good / MANIFEST).write_text(json.dumps({"files": files}))
    check_model_dir(good)
    with (good / "model.safetensors").open("r+b") as weights:
        weights.seek(-4, 2)
        weights.write(b"\0\0\0\0")
    with pytest.raises(ValueError, match=r"model\.safetensors does not match its manifest"):
        resolve(good)
    (good / MANIFEST).write_text(json.dumps({"files": [{**files[0], "path": "../x"}]}))
    with pytest.raises(ValueError, match="outside the checkpoint"):
        resolve(good)


@pytest.mark.stack
def test_the_training_route_sends_its_actor_no_secret(stack_base, ray_session,
                                                      monkeypatch) -> None:
    """`POST /v1/ops/train` hands a detached actor the settings: Ray keeps actor arguments,
    so the secrets must travel through the cluster's KV (share/unshare) like Serve's."""
    import json
    import time
    import uuid

    import ray

    from chatreid.cluster import unshare
    from services.retrieval import ops

    settings = stack_base.model_copy(deep=True)
    settings.serve.app_name = f"t{uuid.uuid4().hex[:8]}"  # its own training-runs actor
    settings.serve.api_key, settings.kafka.sasl_password = "key-123", "kafka-456"
    secrets = ("key-123", "kafka-456", settings.s3.secret_key.get_secret_value())

    sent: list[dict] = []

    class Runs:  # what the route's call hands the actor
        class start:  # mirrors the actor method
            @staticmethod
            def remote(data: dict, target: str, preset: str) -> str:
                sent.append(data)
                return "ref"

    with monkeypatch.context() as m:
        m.setattr(ops, "training_runs", lambda _settings: Runs)
        assert ops.start_training(settings, "embedder", "micro") == "ref"
    assert not any(s in json.dumps(sent[0]) for s in secrets)
    assert unshare(sent[0]) == settings

    # the real actor gets its secrets back: a bad target fails on the target, not on them
    run = ray.get(ops.start_training(settings, "no-such-target", "micro"))
    actor = ops.training_runs(settings)
    try:
        deadline = time.monotonic() + 120
        while run["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.5)
            run = ray.get(actor.get.remote(run["run_id"]))
        assert run["state"] == "failed" and "no-such-target" in run["detail"], run
        assert "secrets" not in run["detail"]
    finally:
        ray.kill(actor)
