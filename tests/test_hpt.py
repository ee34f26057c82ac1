"""Hierarchical Progressive Tuning: stage rules, response-only loss, best-choice scoring, and the
Ray Train chain end to end on the tiny model (checkpoints, manifests, events, worker failure)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from chatreid.checkpoints import pull
from chatreid.config import Settings
from chatreid.data.instructions import build_stage1, build_stage3
from chatreid.model import build_model, save_checkpoint
from chatreid.model.prompting import choice_tokens
from chatreid.tuning.collate import IGNORE, collate, encode_sample
from chatreid.tuning.evaluate import choice_probabilities
from chatreid.tuning.stages import prepare_stage_model, resize_for, rule_for

from .conftest import env_for


def load(path: str) -> Image.Image:
    return Image.open(path)


def visual_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.model.visual.state_dict().items()}


def decoder_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.model.language_model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- stage rules -------------------------------------------------------------------------------


def test_resolution_rules_follow_the_paper() -> None:
    small, big = Image.new("RGB", (40, 100)), Image.new("RGB", (300, 600))
    assert resize_for(rule_for(1), small).size == (128, 256)  # up to 256×128
    assert resize_for(rule_for(1), big).size == (300, 600)
    assert resize_for(rule_for(2), big).size == (192, 384)  # down to 384×192
    assert resize_for(rule_for(2), small).size == (40, 100)
    assert resize_for(rule_for(3), big).size == (300, 600)  # native
    with pytest.raises(ValueError, match="unknown HPT stage"):
        rule_for(4)


def _perturbed_checkpoint(tmp: Path) -> Path:
    """A 'trained' tiny model: every weight moved, so inheritance is visible."""
    model, processor = build_model("tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    return save_checkpoint(model, processor, tmp / "parent")


def test_stage2_keeps_the_encoder_and_takes_a_fresh_decoder(tmp_path: Path) -> None:
    parent_dir = _perturbed_checkpoint(tmp_path)
    parent, _ = build_model(str(parent_dir))
    base, _ = build_model("tiny")
    model, _ = prepare_stage_model(2, "tiny", parent_dir)
    assert same(visual_state(model), visual_state(parent))
    assert same(decoder_state(model), decoder_state(base))
    assert not same(decoder_state(model), decoder_state(parent))
    assert all(p.requires_grad for p in model.parameters())


def test_stage3_inherits_everything_and_freezes_the_encoder(tmp_path: Path) -> None:
    parent_dir = _perturbed_checkpoint(tmp_path)
    parent, _ = build_model(str(parent_dir))
    model, _ = prepare_stage_model(3, "tiny", parent_dir)
    assert same(visual_state(model), visual_state(parent))
    assert same(decoder_state(model), decoder_state(parent))
    assert not any(p.requires_grad for p in model.model.visual.parameters())
    assert all(p.requires_grad for p in model.model.language_model.parameters())


def test_stage1_trains_everything_from_the_base() -> None:
    model, _ = prepare_stage_model(1, "tiny", None)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("stage", [2, 3])
def test_ablations_start_later_stages_from_the_base(stage: int) -> None:
    """Table 4's "3 only" and "2+3" rows: no parent, the base model under the stage's rule."""
    base, _ = build_model("tiny")
    model, _ = prepare_stage_model(stage, "tiny", None)
    assert same(visual_state(model), visual_state(base))
    assert same(decoder_state(model), decoder_state(base))
    assert all(p.requires_grad == (stage == 2) for p in model.model.visual.parameters())


# --- inputs and loss ---------------------------------------------------------------------------


def test_loss_is_on_the_response_tokens_only(world: Path) -> None:
    model, processor = build_model("tiny")
    samples = build_stage1(world, seed=0, n=2) + build_stage3(world, seed=0, n=2)
    encoded = [encode_sample(s, processor, load, rule_for(s.stage)) for s in samples]
    for sample, enc in zip(samples, encoded, strict=True):
        target = enc["input_ids"][enc["labels"] != IGNORE]
        assert processor.tokenizer.decode(target) == sample.response + "<|im_end|>"
        # every image placeholder expanded inside the prompt part, none in the response
        assert (enc["input_ids"][enc["labels"] != IGNORE] != model.config.image_token_id).all()
    batch = collate(encoded, processor.tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert int(batch["image_grid_thw"].shape[0]) == sum(len(s.images) for s in samples)
    assert torch.isfinite(model(**batch).loss)


def test_best_choice_confidences_cover_the_gallery(world: Path) -> None:
    model, processor = build_model("tiny")
    tokens = choice_tokens(processor.tokenizer, 8)
    assert len(set(tokens.index_ids)) == 8
    sample = build_stage3(world, seed=3, n=1)[0]
    size = len(sample.meta["gallery"])
    probs = choice_probabilities(model, processor, sample, load, rule_for(3), tokens)
    assert probs.shape == (size,)
    assert np.isclose(probs.sum(), 1.0, atol=1e-5) and (probs > 0).all()


# --- the Ray Train chain -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_settings(stack_base: Settings, world: Path, tmp_path_factory: pytest.TempPathFactory):
    from chatreid.bus import ensure_topics
    from chatreid.storage import ObjectStore

    tag = uuid.uuid4().hex[:10]
    s = stack_base.model_copy(deep=True)
    s.kafka.topic_prefix, s.kafka.partitions, s.s3.bucket = f"t{tag}", 1, f"t{tag}"
    s.train.world = world
    s.train.base_model = "tiny"
    s.train.checkpoint_every = 3
    s.train.out_dir = tmp_path_factory.mktemp("train-out")
    store = ObjectStore(s.s3)
    store.ensure_bucket()
    ensure_topics(s.kafka)
    yield s
    store.drop_bucket()


@pytest.fixture(scope="module")
def chain(train_settings: Settings, ray_session):
    from ray_jobs.train import PRESETS, train

    return train(train_settings, "all", recipe=PRESETS["micro"])  # embedder → S1 → S2 → S3


@pytest.mark.stack
def test_chain_runs_every_stage_from_the_one_before(chain) -> None:
    assert chain.embedder is not None and chain.embedder.model == "embedder"
    assert [s.stage for s in chain.stages] == [1, 2, 3]
    assert chain.stages[0].parent_version is None
    for prev, cur in zip(chain.stages, chain.stages[1:], strict=False):
        assert cur.parent_version == prev.version
    for s in chain.stages:
        assert s.metrics["loss"] < s.metrics["first_loss"], f"stage {s.stage} did not learn"
        assert s.metrics["step"] == s.metrics["steps"] == 6
        assert 0.0 <= s.metrics["eval/rank1"] <= 1.0
        assert s.metrics["eval/eval_samples"] == 8
    # the report people look at
    report = json.loads((chain_out(chain) / "report.json").read_text())
    assert [s["version"] for s in report["stages"]] == [s.version for s in chain.stages]


def chain_out(chain) -> Path:
    return Path(chain.out_dir)


@pytest.mark.stack
def test_checkpoints_verify_and_obey_the_stage_rules(
    chain, train_settings: Settings, tmp_path: Path
) -> None:
    pull(train_settings, chain.embedder, tmp_path / "embedder")  # verifies every sha256
    models = {}
    for s in chain.stages:
        manifest = pull(train_settings, s.event, tmp_path / s.version)  # verifies every sha256
        assert manifest["stage"] == f"stage{s.stage}"
        assert manifest["parent_version"] == s.parent_version
        assert manifest["data_hash"] == chain.datasets[s.stage].dataset_id
        assert manifest["config"]["stage"] == s.stage
        models[s.stage], _ = build_model(str(tmp_path / s.version))
    base, _ = build_model("tiny")
    # stage 1 trained both halves
    assert not same(visual_state(models[1]), visual_state(base))
    assert not same(decoder_state(models[1]), decoder_state(base))
    # stage 3: encoder frozen (bit-identical to stage 2's), decoder trained
    assert same(visual_state(models[3]), visual_state(models[2]))
    assert not same(decoder_state(models[3]), decoder_state(models[2]))


@pytest.mark.stack
def test_stage3_carries_an_identity_head_on_the_chains_embedder(
    chain, train_settings: Settings, tmp_path: Path
) -> None:
    from chatreid.model.identity import IdentityVision

    heads = {}
    for s in chain.stages:
        pull(train_settings, s.event, tmp_path / s.version)
        heads[s.stage] = IdentityVision.load(tmp_path / s.version)
    assert heads[1] is None and heads[2] is None  # only the stage a rerank serves gets one
    head = heads[3]
    assert head is not None
    embedder_dir = tmp_path / "embedder"
    pull(train_settings, chain.embedder, embedder_dir)
    from chatreid.embedder import load_embedder

    assert head.version == load_embedder(embedder_dir).version  # the chain's new embedder
    m = chain.stages[-1].metrics
    assert 0.0 <= m["identity/eval/rank1"] <= 1.0 and m["identity/groups"] > 0
    assert 0.0 <= m["eval_with_identity/rank1"] <= 1.0
    assert m["eval_with_identity/eval_samples"] == 8
    assert m["vision_cache_hits"] >= 0  # stage 3's frozen encoder ran from the cache
    # per-kind verdicts were judged on the fit world (new people and cameras) as well
    assert m["identity/fit/world_seed"] == json.loads(
        (train_settings.train.world / "manifest.json").read_text())["seed"] + 1_000_003_000
    assert any(k.endswith("/fit_world/gain_lower_bound") for k in m)
    assert any(k.endswith("/training_world/gain_lower_bound") for k in m)
    # the micro recipe's trait reader: the training world's people but the held-out ones
    assert head.traits is not None and m["identity/traits/crops"] > 0
    assert set(head.head.cfg.traits) <= {"standard", "cloth_changing", "visible_infrared"}
    assert head.head.cfg.traits  # every image kind got a fitted trait weight (0 included)


@pytest.mark.stack
def test_the_identity_head_trains_again_as_a_child_version_with_the_same_decoder(
    chain, train_settings: Settings, tmp_path: Path
) -> None:
    """`chatreid train --stage identity --model V`: V's head is fitted again on V's own stage-3
    data - each image kind's fit on the world's whole layout - and pushed as a new stage-3
    version whose parent is V; the decoder's files are V's, byte for byte."""
    from typer.testing import CliRunner

    from chatreid.app.cli import app
    from chatreid.checkpoints import find
    from chatreid.model.identity import IDENTITY_DIR
    from ray_jobs.hpt import refit_identity

    s3 = chain.stages[-1]
    outcome = refit_identity(train_settings, s3.version)
    assert outcome.version != s3.version and outcome.parent_version == s3.version
    manifest = pull(train_settings, outcome.event, tmp_path / "refit")
    assert manifest["stage"] == "stage3" and manifest["parent_version"] == s3.version
    assert manifest["data_hash"] == chain.datasets[3].dataset_id
    assert manifest["config"]["identity_refit_of"] == s3.version
    old = {f.path: f.sha256 for f in s3.event.files}
    new = {f.path: f.sha256 for f in outcome.event.files}
    assert {p: h for p, h in new.items() if not p.startswith(IDENTITY_DIR)} == \
        {p: h for p, h in old.items() if not p.startswith(IDENTITY_DIR)}
    m = outcome.metrics
    fitted = [k for k in ("standard", "cloth_changing", "visible_infrared")
              if f"identity/kind/{k}/shortlists" in m]
    assert "standard" in fitted and m["identity/kind/standard/shortlists"] > 0
    assert all(m[f"identity/kind/{k}/abstain"] in (0.0, 1.0) for k in fitted)
    assert m["eval_with_identity/eval_samples"] == 8  # the chain's held-out data, found again
    assert find(train_settings, "vlm", outcome.version) is not None
    # the command line: one needs the other, and an unknown version is a clear error
    env = {**env_for(train_settings), "COLUMNS": "200", "NO_COLOR": "1"}
    result = CliRunner().invoke(app, ["train", "--stage", "identity"], env=env)
    assert result.exit_code == 2 and "--model goes with --stage identity" in result.output
    result = CliRunner().invoke(app, ["train", "--stage", "identity", "--model", "hpt3-nope"],
                                env=env)
    assert result.exit_code == 2 and "no complete stage-3 checkpoint 'hpt3-nope'" in result.output


@pytest.mark.stack
def test_checkpoint_events_reach_the_bus(chain, train_settings: Settings) -> None:
    from chatreid.bus import make_consumer
    from schemas import CHECKPOINTS, CheckpointEvent

    consumer = make_consumer(train_settings.kafka, group_id=None)
    topic = train_settings.kafka.topic(CHECKPOINTS.name)
    from kafka import TopicPartition

    consumer.assign([TopicPartition(topic, 0)])
    consumer.seek_to_beginning()
    seen = []
    for _ in range(10):
        for records in consumer.poll(timeout_ms=1000).values():
            seen += [CheckpointEvent.model_validate_json(r.value) for r in records]
    consumer.close()
    vlm, ours = [e for e in seen if e.model == "vlm"], [s.version for s in chain.stages]
    assert [e.version for e in vlm if e.version in ours] == ours  # each stage once, in order
    # any other is a head trained again on the chain's stage 3 (a test above may run first)
    assert all(e.parent_version == ours[-1] for e in vlm if e.version not in ours)
    assert [e.version for e in seen if e.model == "embedder"] == [chain.embedder.version]


def _train_workers() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"RayTrainWorker" in cmdline:
            pids.append(int(proc.name))
    return pids


@pytest.mark.stack
def test_a_killed_worker_resumes_from_the_last_checkpoint(
    chain, train_settings: Settings
) -> None:
    """SIGKILL one worker after the first checkpoint: the job restarts and finishes from it."""
    from chatreid.storage import ObjectStore
    from chatreid.tuning.hpt import HPTConfig
    from ray_jobs.hpt import StageJob, run_stage

    cfg = HPTConfig(stage=3, base_model="tiny", lr=1e-3, max_steps=60, epochs=30, seed=7)
    stage3 = chain.stages[-1]
    job = StageJob(hpt=cfg, dataset_id=chain.datasets[3].dataset_id,
                   num_shards=chain.datasets[3].num_shards, world_id=chain.world_id,
                   world_root=str(train_settings.train.world), parent=chain.stages[1].event)
    store = ObjectStore(train_settings.s3)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.setdefault("out", run_stage(train_settings,
                                                                                 job)))
    runner.start()
    killed = None
    deadline = time.monotonic() + 240
    while killed is None and time.monotonic() < deadline and runner.is_alive():
        checkpoints = {k.split("/checkpoint_")[1].split("/")[0]
                       for k in store.list(train_settings.train.storage_prefix)
                       if "/checkpoint_" in k and "vlm-hpt3" in k and stage3.version not in k}
        # the second upload means the first is registered (a kill right after an upload can
        # beat its registration, and then the job rightly resumes from the one before)
        if len(checkpoints) >= 2:
            workers = _train_workers()
            if workers:
                killed = workers[-1]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.5)
    runner.join(timeout=300)
    assert killed is not None, "no checkpoint appeared before the job ended"
    out = result["out"]
    assert out.metrics["resumed_from_step"] >= 3  # not from scratch
    assert out.metrics["step"] == out.metrics["steps"] == 60


@pytest.mark.stack
def test_the_deepspeed_path_trains_through_the_same_job(chain, train_settings: Settings) -> None:
    """ZeRO-2 through Ray Train (the GPU path; on CPU DeepSpeed's CPU accelerator over gloo)."""
    from chatreid.tuning.hpt import HPTConfig
    from ray_jobs.hpt import StageJob, run_stage

    settings = train_settings.model_copy(deep=True)
    settings.train.deepspeed, settings.train.zero_stage = True, 2
    cfg = HPTConfig(stage=1, base_model="tiny", lr=1e-3, max_steps=6)
    job = StageJob(hpt=cfg, dataset_id=chain.datasets[1].dataset_id,
                   num_shards=chain.datasets[1].num_shards, world_id=chain.world_id,
                   world_root=str(settings.train.world))
    out = run_stage(settings, job)
    assert out.version != chain.stages[0].version  # the runtime is part of the version
    assert out.event.metrics["loss"] < out.event.metrics["first_loss"]
    assert out.metrics["step"] == 6


def test_a_recipe_with_extra_people_gets_their_world_beside_the_training_world(
        tmp_path: Path) -> None:
    from rich.console import Console

    from ray_jobs.train import PRESETS, ensure_extra_world

    world = tmp_path / "synth"
    micro = PRESETS["micro"]
    assert ensure_extra_world(world, micro, Console()) is None  # the presets' default: none
    recipe = micro.model_copy(update={"embedder_extra_people": 8})
    root = ensure_extra_world(world, recipe, Console())
    assert root is not None and root.parent == tmp_path and root != world
    written = (root / "manifest.json").stat().st_mtime_ns
    assert ensure_extra_world(world, recipe, Console()) == root  # there already: kept as is
    assert (root / "manifest.json").stat().st_mtime_ns == written
    assert '"n_identities": 8' in (root / "manifest.json").read_text()


def test_the_same_decoder_with_a_head_over_another_embedder_is_another_version() -> None:
    """Two stage-3 chains over different prefilter embedders once got one version (the
    identity head was not in it), so the second run's figures overwrote the first's."""
    from chatreid.tuning.hpt import HPTConfig
    from ray_jobs.hpt import Runtime, StageJob, identity_recipe, version_for

    settings = Settings()
    runtime = Runtime.of(settings.train)
    job = StageJob(hpt=HPTConfig(stage=3, base_model="tiny"), dataset_id="d3", num_shards=1,
                   world_id="w")
    assert identity_recipe(settings, job) is None  # no head: the version is the decoder's
    headed = job.model_copy(update={"identity_backbone": "imagenet"})
    recipe = identity_recipe(settings, headed)
    assert recipe is not None and recipe["backbone"].startswith("imagenet-mobilenetv2-")
    other = {**recipe, "backbone": "reid-mobilenetv2-1280d-000000000000@256x128"}
    fewer_epochs = {**recipe, "epochs": recipe["epochs"] + 1}
    versions = {version_for(job, runtime), version_for(headed, runtime, recipe),
                version_for(headed, runtime, other), version_for(headed, runtime, fewer_epochs)}
    with_traits = identity_recipe(settings, headed.model_copy(update={"trait_people": 0}))
    assert with_traits == {**recipe, "trait_people": 0}  # a head with a reader: another version
    versions.add(version_for(headed, runtime, with_traits))
    assert len(versions) == 5
    assert version_for(headed, runtime, recipe) == version_for(headed, runtime, dict(recipe))
    # stages 1 and 2 attach no head, whatever the job names
    stage2 = headed.model_copy(update={"hpt": HPTConfig(stage=2, base_model="tiny")})
    assert identity_recipe(settings, stage2) is None


def test_ablation_switch_selects_the_papers_rows() -> None:
    from ray_jobs.train import vlm_stages

    assert vlm_stages("all", None) == (1, 2, 3)
    assert vlm_stages("all", "2+3") == (2, 3)
    assert vlm_stages("all", "3") == (3,)
    assert vlm_stages("2", None) == (2,)
    assert vlm_stages("embedder", None) == ()
    with pytest.raises(ValueError, match="ablation must be one of"):
        vlm_stages("all", "1+3")
    with pytest.raises(ValueError, match="applies to --stage all"):
        vlm_stages("3", "2+3")


@pytest.mark.stack
def test_a_single_later_stage_needs_its_parent(settings: Settings) -> None:
    from ray_jobs.train import parent_for

    assert parent_for(settings, (1,), "1") is None  # stage 1 starts from the base
    with pytest.raises(LookupError, match="needs a stage 2 checkpoint"):
        parent_for(settings, (3,), "3")


@pytest.mark.stack
def test_train_says_when_the_identity_head_would_sit_on_an_embedder_older_than_the_newest(
        settings: Settings, tmp_path: Path) -> None:
    """'prefilter' means the embedder serving now; a trained one that was never rolled out is
    newer, and an operator expecting the head on it must be told (Table 4's heads once fell
    back to ImageNet features that way, unnoticed)."""
    from rich.console import Console

    from ray_jobs.train import note_unserved_embedder

    from .test_embedder_training import make_release

    def said() -> str:
        console = Console(record=True, width=200)
        note_unserved_embedder(settings, console)
        return console.export_text()

    assert said() == ""  # nothing trained: the configured embedder is the newest there is
    newer = make_release(settings, tmp_path)
    text = said()
    assert newer.version in text and "not rolled out" in text
