"""The stats report of an instruction dataset: task mix, gallery sizes, answers, coverage, lengths.

Each shard counts its own samples into a ``ShardStats``; counts add up, so the driver merges the
shards' stats without reading the samples again. What an answer says is read off its keys, the
same for every stage: ``match`` (yes/no tasks), ``choice`` (the chosen position), ``indices``
(how many gallery images match), ``common`` (attributes two people share), ``attributes``
(the gender balance of the described people).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from pydantic import BaseModel, Field
from rich.console import Group
from rich.table import Table

from chatreid.data.instructions import InstructionSample

# answer key -> (summary name, the value counted)
ANSWER_SUMMARIES: dict[str, tuple[str, Callable[[Any], object]]] = {
    "match": ("yes/no", lambda v: "yes" if v else "no"),
    "choice": ("chosen position", int),
    "indices": ("number of matches", len),
    "common": ("attributes in common", len),
    "attributes": ("gender", lambda v: v["gender"]),
}


def _bump(counts: dict[Any, int], key: Any, n: int = 1) -> None:
    counts[key] = counts.get(key, 0) + n


def _add_nested(dst: dict[Any, Any], src: Mapping[Any, Any]) -> None:
    """``dst += src`` for nested dicts of counts."""
    for key, value in src.items():
        if isinstance(value, Mapping):
            _add_nested(dst.setdefault(key, {}), value)
        else:
            _bump(dst, key, value)


def _pids(meta: Any) -> Iterator[int]:
    """Identities named anywhere in a sample's meta (``pid``, ``pids``, ``caption_pid``...)."""
    if isinstance(meta, Mapping):
        for key, value in meta.items():
            if key == "pids":
                yield from (int(p) for p in value)
            elif key.endswith("pid") and isinstance(value, int):
                yield value
            else:
                yield from _pids(value)
    elif isinstance(meta, list):
        for value in meta:
            yield from _pids(value)


def gallery_size(sample: InstructionSample) -> int | None:
    """Candidates a sample chooses among, where its meta says (stage-3 galleries, many-to-many)."""
    if isinstance(sample.meta.get("gallery"), list):
        return len(sample.meta["gallery"])
    size = sample.meta.get("gallery_size")
    return int(size) if size is not None else None


class ShardStats(BaseModel):
    """Counts over some samples; ``merge`` adds two of them."""

    tasks: dict[str, int] = Field(default_factory=dict)
    images_per_sample: dict[str, dict[int, int]] = Field(default_factory=dict)
    gallery_size: dict[str, dict[int, int]] = Field(default_factory=dict)
    answers: dict[str, dict[str, dict[str, int]]] = Field(default_factory=dict)
    pids: set[int] = Field(default_factory=set)
    images: set[str] = Field(default_factory=set)
    prompt_words: dict[int, int] = Field(default_factory=dict)
    response_words: dict[int, int] = Field(default_factory=dict)

    def add(self, sample: InstructionSample) -> None:
        task = sample.task
        _bump(self.tasks, task)
        _bump(self.images_per_sample.setdefault(task, {}), len(sample.images))
        size = gallery_size(sample)
        if size is not None:
            _bump(self.gallery_size.setdefault(task, {}), size)
        for key, (name, summarize) in ANSWER_SUMMARIES.items():
            if key in sample.answer:
                summary = self.answers.setdefault(task, {}).setdefault(name, {})
                _bump(summary, str(summarize(sample.answer[key])))
        self.pids.update(_pids(sample.meta))
        self.images.update(sample.images)
        _bump(self.prompt_words, len(sample.prompt.split()))
        _bump(self.response_words, len(sample.response.split()))

    def merge(self, other: ShardStats) -> ShardStats:
        out = self.model_copy(deep=True)
        for name in ("tasks", "images_per_sample", "gallery_size", "answers"):
            _add_nested(getattr(out, name), getattr(other, name))
        _add_nested(out.prompt_words, other.prompt_words)
        _add_nested(out.response_words, other.response_words)
        out.pids |= other.pids
        out.images |= other.images
        return out


# ----------------------------------------------------------------------------- the report


class LengthStats(BaseModel):
    """Whitespace-separated words (a rough token count)."""

    mean: float
    min: int
    p50: int
    p95: int
    max: int

    @classmethod
    def from_counts(cls, counts: Mapping[int, int]) -> LengthStats:
        values = sorted(counts)
        total = sum(counts.values())
        if not total:
            return cls(mean=0.0, min=0, p50=0, p95=0, max=0)

        def quantile(q: float) -> int:
            seen = 0
            for v in values:
                seen += counts[v]
                if seen >= q * total:
                    return v
            return values[-1]

        mean = sum(v * c for v, c in counts.items()) / total
        return cls(mean=round(mean, 2), min=values[0], p50=quantile(0.5), p95=quantile(0.95),
                   max=values[-1])


class TaskStats(BaseModel):
    count: int
    fraction: float
    images_per_sample: dict[int, int]
    gallery_size: dict[int, int]
    answers: dict[str, dict[str, int]]


def _natural(key: Any) -> tuple[int, int, str]:
    """Numbers numerically, then words alphabetically."""
    text = str(key)
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def _sorted(counts: Mapping[Any, int]) -> dict[Any, int]:
    return {k: counts[k] for k in sorted(counts, key=_natural)}


class DatasetReport(BaseModel):
    dataset_id: str
    world_id: str
    stage: int
    num_samples: int
    num_shards: int
    tasks: dict[str, TaskStats]
    identities: int
    images: int
    prompt_words: LengthStats
    response_words: LengthStats
    reused: bool = Field(default=False, exclude=True)  # this call found the dataset built already

    @classmethod
    def from_stats(
        cls, stats: ShardStats, *, dataset_id: str, world_id: str, stage: int, num_shards: int
    ) -> DatasetReport:
        total = sum(stats.tasks.values())
        tasks = {
            task: TaskStats(
                count=count,
                fraction=round(count / total, 6),
                images_per_sample=_sorted(stats.images_per_sample.get(task, {})),
                gallery_size=_sorted(stats.gallery_size.get(task, {})),
                answers={k: _sorted(v) for k, v in sorted(stats.answers.get(task, {}).items())},
            )
            for task, count in sorted(stats.tasks.items())
        }
        return cls(
            dataset_id=dataset_id,
            world_id=world_id,
            stage=stage,
            num_samples=total,
            num_shards=num_shards,
            tasks=tasks,
            identities=len(stats.pids),
            images=len(stats.images),
            prompt_words=LengthStats.from_counts(stats.prompt_words),
            response_words=LengthStats.from_counts(stats.response_words),
        )


# ----------------------------------------------------------------------------- rendering


def _hist(counts: Mapping[Any, int]) -> str:
    return " ".join(f"{k}:{v}" for k, v in counts.items()) or "-"


def _lengths(s: LengthStats) -> str:
    return f"mean {s.mean:g} · p50 {s.p50} · p95 {s.p95} · {s.min}–{s.max}"


def render_report(report: DatasetReport) -> Group:
    """Two tables for the terminal: the dataset at a glance, then one row per task."""
    overview = Table(title=f"instruction dataset {report.dataset_id}", show_header=False)
    overview.add_column("", style="bold")
    overview.add_column("")
    rows = [
        ("world", report.world_id),
        ("stage", str(report.stage)),
        ("samples", f"{report.num_samples} in {report.num_shards} shards"),
        ("identities", str(report.identities)),
        ("images", str(report.images)),
        ("prompt words", _lengths(report.prompt_words)),
        ("response words", _lengths(report.response_words)),
    ]
    for name, value in rows:
        overview.add_row(name, value)

    tasks = Table(title="task mix")
    for col in ("task", "count", "fraction", "images/sample", "gallery size", "answers"):
        tasks.add_column(col, justify="right" if col in ("count", "fraction") else "left")
    for name, t in report.tasks.items():
        answers = "\n".join(f"{k}: {_hist(v)}" for k, v in t.answers.items()) or "-"
        tasks.add_row(name, str(t.count), f"{t.fraction:.3f}", _hist(t.images_per_sample),
                      _hist(t.gallery_size), answers)
    return Group(overview, tasks)
