"""What the rerank-quality report says about a checkpoint comes from that checkpoint's own
manifest: a refitted identity head is a stage-3 checkpoint whose parent is stage 3 too."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from .conftest import load_benchmark


def test_a_refitted_head_reports_its_own_figures_not_its_parents(
        monkeypatch: pytest.MonkeyPatch) -> None:
    rq = load_benchmark("rerank_quality")
    events = {
        "hpt3-refit": SimpleNamespace(stage="stage3", parent_version="hpt3-old",
                                      metrics={"identity/decoder_weight/value": 0.5}),
        "hpt3-old": SimpleNamespace(stage="stage3", parent_version="hpt2-x",
                                    metrics={"identity/decoder_weight/value": 1.0}),
        "hpt2-x": SimpleNamespace(stage="stage2", parent_version=None,
                                  metrics={"eval/rank1": 0.25}),
    }
    monkeypatch.setattr(rq, "find", lambda _settings, _model, version: events.get(version))
    figures = rq.checkpoint_figures(None, "hpt3-refit")
    assert figures["stage3"] == {"identity/decoder_weight/value": 0.5}
    assert figures["stage2"] == {"eval/rank1": 0.25}
