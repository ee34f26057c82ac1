"""Pictures people look at: contact sheets of crops with captions."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


def contact_sheet(images: Sequence[Image.Image], labels: Sequence[str], columns: int = 8,
                  cell: tuple[int, int] = (96, 192), label_h: int = 28,
                  borders: Sequence[str | None] | None = None) -> Image.Image:
    """Grid of crops (aspect kept, letterboxed) with a short label under each.

    ``borders`` colours a frame per cell (e.g. green for a true match), None for no frame.
    """
    if len(images) != len(labels):
        raise ValueError("one label per image")
    n = max(len(images), 1)
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    cw, ch = cell
    sheet = Image.new("RGB", (cols * cw, rows * (ch + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        x, y = (i % cols) * cw, (i // cols) * (ch + label_h)
        thumb = img.convert("RGB")
        thumb.thumbnail((cw - 6, ch - 6))
        sheet.paste(thumb, (x + (cw - thumb.width) // 2, y + (ch - thumb.height) // 2))
        colour = borders[i] if borders else None
        if colour:
            draw.rectangle([x + 1, y + 1, x + cw - 2, y + ch - 2], outline=colour, width=3)
        for j, line in enumerate(label.split("\n")[:2]):
            draw.text((x + 3, y + ch + 2 + j * 12), line[:18], fill="black", font=font)
    return sheet


def results_table(results, gallery: int, title: str, truth: dict[str, bool] | None = None):
    """A rich table of ranked results (``truth``: crop id -> same person, when known)."""
    from rich.table import Table

    table = Table("rank", "score", "camera", "modality", "capture time (UTC)", "crop id",
                  *(["same person"] if truth else []), title=f"{title} — gallery {gallery}")
    for r in results:
        row = [str(r.rank), f"{r.score:.3f}", r.camera, r.modality,
               r.capture_time.strftime("%Y-%m-%d %H:%M:%S"), r.crop_id[:12]]
        if truth:
            row.append("[green]yes[/]" if truth.get(r.crop_id) else "no")
        table.add_row(*row)
    return table


def results_sheet(load: Callable[[str], Image.Image], query: Image.Image, results, path: Path,
                  truth: dict[str, bool] | None = None) -> Path:
    """Query first, then the ranked crops; frames green/red when the truth is known."""
    images = [query] + [load(r.crop_id) for r in results]
    labels = ["QUERY"] + [f"#{r.rank} {r.score:.2f}\n{r.camera} {r.capture_time:%H:%M:%S}"
                          for r in results]
    borders = [None] + [("green" if truth.get(r.crop_id) else "red") if truth else None
                        for r in results]
    path.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(images, labels, borders=borders).save(path)
    return path


def answer_table(response, truth: dict[str, bool] | None = None, title: str | None = None):
    """A rich table of a retrieval answer: VLM confidence first, then the prefilter's view."""
    from rich.table import Table

    title = title or (f"{response.kind} query - model {response.model_version}, "
                      f"{response.candidates} candidates, {response.vlm_calls} VLM calls, "
                      f"{response.elapsed_ms / 1000:.1f} s")
    rationale = any(r.rationale for r in response.results)
    table = Table("rank", "confidence", "prefilter (rank, cos)", "camera", "modality",
                  "capture time (UTC)", "crop id", *(["same person"] if truth else []),
                  *(["rationale"] if rationale else []), title=title)
    for r in response.results:
        cos = f"{r.prefilter_score:.3f}" if r.prefilter_score is not None else "-"
        row = [str(r.rank), f"{r.confidence:.3f}" if r.reranked else "not reranked",
               f"#{r.prefilter_rank}, {cos}", r.camera, r.modality,
               r.capture_time.strftime("%Y-%m-%d %H:%M:%S"), r.crop_id[:12]]
        if truth:
            row.append("[green]yes[/]" if truth.get(r.crop_id) else "no")
        if rationale:
            row.append((r.rationale or "")[:80])
        table.add_row(*row)
    return table


@dataclass(frozen=True)
class Comparison:
    """The prefilter's top and the reranked top of one answer, scored against the truth
    (crop id -> the query's person). Positions are 1-based; a first hit of None: none."""

    top: int
    prefilter: list  # ResultItems in the prefilter's order, its first ``top``
    reranked: list  # ResultItems in the answer's (reranked) order, its first ``top``
    truth: dict[str, bool]
    relevant: int  # the person's crops in the whole shortlist

    def hits(self, results: list) -> int:
        return sum(bool(self.truth.get(r.crop_id)) for r in results)

    def first_hit(self, results: list) -> int | None:
        return next((i for i, r in enumerate(results, 1) if self.truth.get(r.crop_id)), None)

    def average_precision(self, results: list) -> float:
        """AP@top: the mean, over the positions holding the person, of the share of the person
        among the results up to there, divided by the most hits a top can hold
        (min(top, relevant)); 1.0 = every crop of the person the shortlist has, first."""
        found, total = 0, 0.0
        for i, r in enumerate(results, 1):
            if self.truth.get(r.crop_id):
                found += 1
                total += found / i
        best = min(self.top, self.relevant)
        return total / best if best else 0.0

    @property
    def worse(self) -> bool:
        """The reranked top holds fewer of the person's crops than the prefilter's, or as many
        with the first one later."""
        ours, theirs = self.hits(self.reranked), self.hits(self.prefilter)
        if ours != theirs:
            return ours < theirs
        a, b = self.first_hit(self.reranked), self.first_hit(self.prefilter)
        return b is not None and (a is None or a > b)


def compare_answers(response, truth: dict[str, bool], top: int) -> Comparison:
    """The prefilter's top ``top`` rebuilt from the answer (each result carries its prefilter
    rank) next to the reranked top. The answer must hold the prefilter's whole top: ask with
    ``top`` >= ``k`` (every shortlisted crop comes back), else a ValueError says so."""
    by_prefilter = sorted(response.results, key=lambda r: r.prefilter_rank)
    prefilter = by_prefilter[:top]
    wanted = list(range(1, min(top, response.candidates) + 1))
    if [r.prefilter_rank for r in prefilter] != wanted:
        raise ValueError(f"the answer ({len(response.results)} results) does not hold the "
                         f"prefilter's top {len(wanted)}: ask with top >= k")
    relevant = sum(bool(truth.get(r.crop_id)) for r in response.results)
    return Comparison(top, prefilter, list(response.results[:top]), dict(truth), relevant)


def comparison_table(c: Comparison, response=None, title: str | None = None):
    """Rank by rank: the prefilter's crop (cosine, same person?) beside the reranked crop (VLM
    confidence, where the prefilter had it, same person?)."""
    from rich.table import Table

    if title is None and response is not None:
        title = (f"prefilter vs VLM rerank - model {response.model_version or 'none'}, "
                 f"{response.candidates} candidates, {response.vlm_calls} VLM calls, "
                 f"{response.elapsed_ms / 1000:.1f} s")
    # narrow enough for an 80-column terminal; capture times are on the contact sheet
    table = Table("rank", "prefilter crop", "cos", "same?", "reranked crop", "conf.", "was #",
                  "same?", title=title)

    def crop(r) -> str:
        return f"{r.crop_id[:8]} {r.camera}"

    def person(r) -> str:
        return "[green]yes[/]" if c.truth.get(r.crop_id) else "[red]no[/]"

    for i in range(max(len(c.prefilter), len(c.reranked))):
        row = [str(i + 1)]
        if i < len(c.prefilter):
            p = c.prefilter[i]
            cos = f"{p.prefilter_score:.3f}" if p.prefilter_score is not None else "-"
            row += [crop(p), cos, person(p)]
        else:
            row += ["", "", ""]
        if i < len(c.reranked):
            r = c.reranked[i]
            row += [crop(r), f"{r.confidence:.3f}" if r.reranked else "not reranked",
                    f"#{r.prefilter_rank}", person(r)]
        else:
            row += ["", "", "", ""]
        table.add_row(*row)
    return table


def comparison_summary(c: Comparison) -> str:
    """One line: the person's crops in each top, where the first one is, and AP@top."""
    def part(name: str, results: list) -> str:
        first = c.first_hit(results)
        return (f"{name}: {c.hits(results)}/{len(results)} the query's person (first at "
                f"{f'#{first}' if first else 'none'}, AP@{c.top} "
                f"{c.average_precision(results):.2f})")

    return (f"{part('prefilter', c.prefilter)}; {part('VLM reranked', c.reranked)}; "
            f"the shortlist holds {c.relevant} of the person's crops")


def answer_sheet(load: Callable[[str], Image.Image], query: Image.Image | None, response,
                 path: Path, truth: dict[str, bool] | None = None) -> Path:
    """The query (or its text) first, then the answer's crops with rank and confidence."""
    if query is None:
        query = Image.new("RGB", (64, 128), "white")
    images = [query] + [load(r.crop_id) for r in response.results]
    labels = ["QUERY"] + [
        f"#{r.rank} " + (f"{r.confidence:.2f}" if r.reranked else "prefilter")
        + f"\n{r.camera} {r.capture_time:%H:%M:%S}" for r in response.results]
    borders = [None] + [("green" if truth.get(r.crop_id) else "red") if truth else None
                        for r in response.results]
    path.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(images, labels, borders=borders).save(path)
    return path


def world_sheet(root: Path, identities: int = 6, per_identity: int = 8) -> Image.Image:
    """Sample identities of a generated world across cameras, outfits and modalities: one row
    per person, from the LTCC-style split (clothes ids) and the SYSU-style split (infrared)."""
    from chatreid.data.datasets import LTCC, SYSUMM01

    ltcc, sysu = LTCC(root / "ltcc"), SYSUMM01(root / "sysu_mm01")
    rgb = {}
    for r in ltcc.query + ltcc.gallery:
        rgb.setdefault(r.pid, []).append(r)
    ir = {}
    for r in sysu.query:
        ir.setdefault(r.pid, []).append(r)
    pids = [p for p in sorted(rgb) if p in ir][:identities]
    images, labels = [], []
    for pid in pids:
        # spread over cameras and outfits first, then infrared views
        seen, row = set(), []
        for r in rgb[pid]:
            if (r.camid, r.clothes_id) not in seen:
                seen.add((r.camid, r.clothes_id))
                row.append((r, f"id{pid} c{r.camid + 1}\nclothes {r.clothes_id}"))
        row = row[: per_identity - 2] + [(r, f"id{pid} c{r.camid + 1}\ninfrared")
                                          for r in ir[pid][:2]]
        row += [(None, "")] * (per_identity - len(row))
        for rec, label in row:
            images.append(Image.open(rec.path) if rec else Image.new("RGB", (8, 8), "white"))
            labels.append(label)
    return contact_sheet(images, labels, columns=per_identity)


def bar_chart(labels: Sequence[str], values: Sequence[float], title: str,
              reference: float | None = None, reference_label: str = "",
              size: tuple[int, int] = (520, 300)) -> Image.Image:
    """A plain bar chart of values in [0, 1] (rank-1 per stage), with an optional dashed line."""
    w, h = size
    left, right, top, bottom = 50, 20, 40, 40
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 12), title, fill="black")
    plot_h = h - top - bottom
    draw.line([(left, top), (left, h - bottom), (w - right, h - bottom)], fill="black")
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = h - bottom - tick * plot_h
        draw.text((8, y - 6), f"{tick:.2f}", fill="gray")
    slot = (w - left - right) / max(1, len(values))
    for i, (label, v) in enumerate(zip(labels, values, strict=True)):
        x0 = left + i * slot + slot * 0.2
        x1 = left + (i + 1) * slot - slot * 0.2
        v = 0.0 if v != v else max(0.0, min(1.0, v))  # NaN (no eval) draws as zero
        draw.rectangle([x0, h - bottom - v * plot_h, x1, h - bottom], fill=(70, 110, 180))
        draw.text((x0, h - bottom - v * plot_h - 14), f"{v:.3f}", fill="black")
        draw.text((x0, h - bottom + 8), label, fill="black")
    if reference is not None:
        y = h - bottom - reference * plot_h
        for x in range(left, w - right, 10):
            draw.line([(x, y), (x + 5, y)], fill=(200, 60, 60))
        draw.text((w - right - 60, y - 14), reference_label, fill=(200, 60, 60))
    return img


def line_chart(series: Mapping[str, Collection[float]], title: str, x_label: str = "rank",
               size: tuple[int, int] = (520, 320)) -> Image.Image:
    """Curves of values in [0, 1] against 1..n (a CMC curve per method), with a legend."""
    w, h = size
    left, right, top, bottom = 50, 20, 40, 45
    colours = [(70, 110, 180), (200, 80, 40), (60, 150, 80), (140, 80, 160)]
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 12), title, fill="black")
    plot_w, plot_h = w - left - right, h - top - bottom
    draw.line([(left, top), (left, h - bottom), (w - right, h - bottom)], fill="black")
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        draw.text((8, h - bottom - tick * plot_h - 6), f"{tick:.2f}", fill="gray")
    n = max((len(v) for v in series.values()), default=1)
    for k in sorted({1, 5, 10, 20, n} & set(range(1, n + 1))):
        x = left + (k - 1) / max(1, n - 1) * plot_w
        draw.text((x - 4, h - bottom + 6), str(k), fill="gray")
    draw.text((w // 2 - 10, h - 16), x_label, fill="black")
    for i, (name, values) in enumerate(series.items()):
        colour = colours[i % len(colours)]
        points = [(left + j / max(1, n - 1) * plot_w,
                   h - bottom - max(0.0, min(1.0, float(v))) * plot_h)
                  for j, v in enumerate(values)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        draw.text((left + 10, top + 4 + 14 * i), f"— {name}", fill=colour)
    return img
