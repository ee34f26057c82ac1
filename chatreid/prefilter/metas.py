"""Per-row crop metadata of the prefilter store, held as numpy columns.

A million ``VectorMeta`` objects cost ~450 bytes a row in Python (object, ``__dict__``, two
strings, a float), more than the SQ8 vector itself. As columns a row costs ~70 bytes: the crop
id in one byte blob with end offsets, camera / site / object-key pattern as small integer codes
into name tables, modality and capture time as numbers. Object keys are almost always
``<prefix><crop id><suffix>`` (``crops/<day>/<id>.jpg``), so only the (prefix, suffix) pair is
interned. ``VectorMeta`` objects are made on demand, for the rows a search returns.

Rows may also carry a colour-attribute vector (computed at embed time, ``colour_dim`` floats,
NaN where a crop came without one), so text queries rank crops without reading their images.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from schemas.events import Modality

_MODALITY_NAMES: tuple[Modality, Modality] = ("rgb", "infrared")


@dataclass(frozen=True)
class VectorMeta:
    crop_id: str
    camera: str
    modality: Modality
    capture_time: float
    site: str = ""
    object_key: str = ""


class Column:
    """Growable 1-d numpy buffer (amortised O(1) append)."""

    def __init__(self, dtype: Any, values: np.ndarray | Sequence[Any] | None = None) -> None:
        self._buf = np.empty(1024, dtype=dtype) if values is None else np.array(values, dtype)
        self.n = 0 if values is None else len(values)

    def extend(self, values: np.ndarray) -> None:
        need = self.n + len(values)
        if need > len(self._buf):
            grown = np.empty(max(need, 2 * len(self._buf)), dtype=self._buf.dtype)
            grown[: self.n] = self._buf[: self.n]
            self._buf = grown
        self._buf[self.n : need] = values
        self.n = need

    @property
    def view(self) -> np.ndarray:
        return self._buf[: self.n]

    @property
    def nbytes(self) -> int:
        return self.n * self._buf.itemsize


class _Names:
    """Interning table: value <-> small int code."""

    def __init__(self, values: Iterable[Any] = ()) -> None:
        self.values: list[Any] = []
        self.codes: dict[Any, int] = {}
        for value in values:
            self.code(value)

    def code(self, value: Any) -> int:
        code = self.codes.get(value)
        if code is None:
            code = self.codes[value] = len(self.values)
            self.values.append(value)
        return code


class MetaTable:
    """Append-only metadata of the store's rows; ``table[row]`` gives a ``VectorMeta``."""

    def __init__(self) -> None:
        self._blob = Column(np.uint8)  # utf-8 crop ids, back to back
        self._ends = Column(np.int64)  # end offset of each row's crop id in the blob
        self.cams = Column(np.intp)  # intp: np.take needs no index conversion (filters)
        self.mods = Column(np.int8)  # 1 = infrared
        self.times = Column(np.float64)
        self._sites = Column(np.int32)
        self._keys = Column(np.int32)
        self.camera_names = _Names()
        self._site_names = _Names()
        # (prefix, suffix) with the crop id between them; (key, None) when the id is absent
        self._key_patterns = _Names()
        self.colour_dim = 0  # 0 until the first row with a colour vector
        self._colours = Column(np.float32)  # row-major (rows, colour_dim)

    def __len__(self) -> int:
        return self._ends.n

    def extend(self, metas: Sequence[VectorMeta], colours: np.ndarray | None = None) -> None:
        """Append rows; ``colours`` (len(metas), colour_dim) float32, NaN rows for crops
        without one. Raises ValueError (before any change) on a colour width that differs."""
        self._extend_colours(len(metas), colours)
        ids = [m.crop_id.encode() for m in metas]
        start = int(self._ends.view[-1]) if len(self) else 0
        self._ends.extend(start + np.cumsum([len(b) for b in ids], dtype=np.int64))
        self._blob.extend(np.frombuffer(b"".join(ids), np.uint8))
        n = len(metas)
        self.cams.extend(np.fromiter((self.camera_names.code(m.camera) for m in metas),
                                     np.intp, n))
        self.mods.extend(np.fromiter((m.modality == "infrared" for m in metas), np.int8, n))
        self.times.extend(np.fromiter((m.capture_time for m in metas), np.float64, n))
        self._sites.extend(np.fromiter((self._site_names.code(m.site) for m in metas),
                                       np.int32, n))
        self._keys.extend(np.fromiter((self._key_patterns.code(_pattern(m)) for m in metas),
                                      np.int32, n))

    def _extend_colours(self, n: int, colours: np.ndarray | None) -> None:
        if colours is not None:
            if colours.ndim != 2 or len(colours) != n or colours.shape[1] < 1:
                raise ValueError(f"colours must have shape ({n}, dim), got {colours.shape}")
            if self.colour_dim and colours.shape[1] != self.colour_dim:
                raise ValueError(f"colour vectors have {colours.shape[1]} values, the store's "
                                 f"{self.colour_dim}")
            if not self.colour_dim:  # the first colours: earlier rows have none
                self.colour_dim = colours.shape[1]
                self._colours.extend(np.full(len(self) * self.colour_dim, np.nan, np.float32))
            self._colours.extend(np.asarray(colours, np.float32).reshape(-1))
        elif self.colour_dim:
            self._colours.extend(np.full(n * self.colour_dim, np.nan, np.float32))

    def colours(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """(len(rows), colour_dim) colour vectors; NaN rows where a crop has none."""
        rows = np.asarray(rows, np.int64)
        return self._colours.view.reshape(-1, max(self.colour_dim, 1))[rows] \
            if self.colour_dim else np.full((len(rows), 0), np.nan, np.float32)

    def crop_id(self, row: int) -> str:
        ends = self._ends.view
        start = int(ends[row - 1]) if row else 0
        return self._blob.view[start : int(ends[row])].tobytes().decode()

    def __getitem__(self, row: int) -> VectorMeta:
        return self.rows([row])[0]

    def rows(self, rows: Sequence[int] | np.ndarray) -> list[VectorMeta]:
        """``VectorMeta`` of each row, in order (one pass over the columns)."""
        rows = np.asarray(rows, np.int64)
        ends = self._ends.view
        stops = ends[rows].tolist()
        starts = np.where(rows > 0, ends[np.maximum(rows - 1, 0)], 0).tolist()
        blob = self._blob.view
        cams, mods = self.cams.view[rows].tolist(), self.mods.view[rows].tolist()
        times, sites = self.times.view[rows].tolist(), self._sites.view[rows].tolist()
        keys = self._keys.view[rows].tolist()
        out = []
        for i in range(len(rows)):
            crop_id = blob[starts[i] : stops[i]].tobytes().decode()
            prefix, suffix = self._key_patterns.values[keys[i]]
            out.append(VectorMeta(
                crop_id=crop_id, camera=self.camera_names.values[cams[i]],
                modality=_MODALITY_NAMES[mods[i]], capture_time=times[i],
                site=self._site_names.values[sites[i]],
                object_key=prefix if suffix is None else f"{prefix}{crop_id}{suffix}"))
        return out

    def take(self, rows: np.ndarray) -> MetaTable:
        """A new table of ``rows`` in that order (compaction); name tables are kept."""
        out = MetaTable()
        out.camera_names, out._site_names = self.camera_names, self._site_names
        out._key_patterns = self._key_patterns
        ends = self._ends.view
        starts = np.concatenate([[0], ends[:-1]])[rows]
        lengths = ends[rows] - starts
        out._ends = Column(np.int64, np.cumsum(lengths))
        if len(rows):
            gather = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
            out._blob = Column(np.uint8, self._blob.view[gather + np.arange(int(lengths.sum()))])
        for name in ("cams", "mods", "times", "_sites", "_keys"):
            col = getattr(self, name)
            setattr(out, name, Column(col.view.dtype, col.view[rows]))
        out.colour_dim = self.colour_dim
        if self.colour_dim:
            out._colours = Column(np.float32, self.colours(rows).reshape(-1))
        return out

    @property
    def nbytes(self) -> int:
        """Resident bytes of the columns (name tables are small and shared)."""
        return sum(c.nbytes for c in (self._blob, self._ends, self.cams, self.mods, self.times,
                                      self._sites, self._keys, self._colours))

    # -- snapshots -------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        names = {"cameras": self.camera_names.values, "sites": self._site_names.values,
                 "keys": self._key_patterns.values, "colour_dim": self.colour_dim}
        buf = io.BytesIO()
        np.savez(buf, blob=self._blob.view, ends=self._ends.view, cams=self.cams.view,
                 mods=self.mods.view, times=self.times.view, sites=self._sites.view,
                 keys=self._keys.view, colours=self._colours.view,
                 names=np.frombuffer(json.dumps(names).encode(), np.uint8))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> MetaTable:
        arrays = np.load(io.BytesIO(data), allow_pickle=False)
        names = json.loads(arrays["names"].tobytes())
        table = cls()
        table.camera_names, table._site_names = _Names(names["cameras"]), _Names(names["sites"])
        table._key_patterns = _Names(tuple(p) for p in names["keys"])
        for attr, key in (("_blob", "blob"), ("_ends", "ends"), ("cams", "cams"),
                          ("mods", "mods"), ("times", "times"), ("_sites", "sites"),
                          ("_keys", "keys"), ("_colours", "colours")):
            setattr(table, attr, Column(arrays[key].dtype, arrays[key]))
        table.colour_dim = int(names["colour_dim"])
        table._check()
        return table

    def _check(self) -> None:
        n = len(self)
        if any(c.n != n for c in (self.cams, self.mods, self.times, self._sites, self._keys)):
            raise ValueError("metadata columns disagree on the number of rows")
        ends = self._ends.view
        if n and (ends[-1] != self._blob.n or (np.diff(ends) < 0).any() or ends[0] < 0):
            raise ValueError("metadata crop id offsets are inconsistent")
        for col, table in ((self.cams, self.camera_names), (self._sites, self._site_names),
                           (self._keys, self._key_patterns)):
            if n and (col.view.min() < 0 or col.view.max() >= len(table.values)):
                raise ValueError("metadata codes point outside their name tables")
        if self._colours.n != n * self.colour_dim:
            raise ValueError("metadata colour vectors disagree on the number of rows")
        if n and not np.isin(self.mods.view, (0, 1)).all():
            raise ValueError("metadata modality codes must be 0 or 1")


def _pattern(meta: VectorMeta) -> tuple[str, str | None]:
    key, crop_id = meta.object_key, meta.crop_id
    if crop_id and crop_id in key:
        prefix, suffix = key.split(crop_id, 1)
        return prefix, suffix
    return key, None
