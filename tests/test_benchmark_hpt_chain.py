"""A Table 4 chain run without the embedder stage reuses its bucket's embedder, and its
identity head must sit on that embedder: 'prefilter' would name the serving one, and nothing is
rolled out in a benchmark bucket (two chains once got heads on ImageNet features that way)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from rich.console import Console

from chatreid.config import Settings

from .conftest import load_benchmark


def test_a_chain_without_the_embedder_stage_puts_its_head_on_the_buckets_embedder(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import chatreid.checkpoints

    chain = load_benchmark("hpt_chain")
    newest = SimpleNamespace(version="reid-mobilenetv2-1280d-abc@256x128")
    monkeypatch.setattr(chatreid.checkpoints, "latest", lambda *_: newest)
    settings = Settings()
    chain.pin_identity_backbone(settings, Console(quiet=True))
    assert settings.train.vision_backbone == newest.version
    chosen = Settings()  # a backbone the operator named stays
    chosen.train.vision_backbone = "imagenet"
    chain.pin_identity_backbone(chosen, Console(quiet=True))
    assert chosen.train.vision_backbone == "imagenet"


def test_each_preset_is_measured_against_its_own_wall_budget() -> None:
    """The quick preset's chain is judged against its 20-minute budget, the default's against
    60 minutes; a preset sized for CI has none and the benchmark says so instead of inventing
    one."""
    chain = load_benchmark("hpt_chain")
    assert chain.budget_min("quick") == 20.0
    assert chain.budget_min("default") == 60.0
    with pytest.raises(SystemExit, match="names no wall budget"):
        chain.budget_min("micro")
