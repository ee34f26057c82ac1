"""Shared base of the dataset readers: thin parsers of an on-disk layout into records."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class DatasetLayoutError(FileNotFoundError):
    """The folder does not hold the expected layout; the message names what is missing."""


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    pid: int
    camid: int  # 0-based, as in torchreid
    clothes_id: int | None = None
    modality: str = "rgb"
    captions: tuple[str, ...] = ()


class ImageDataset:
    """Base reader. Subclasses set ``required`` (paths that must exist in the dataset folder),
    ``aliases`` (sub-folder names tried under ``root``) and implement ``_load``."""

    name: ClassVar[str] = "dataset"
    aliases: ClassVar[tuple[str, ...]] = ()
    required: ClassVar[tuple[str, ...]] = ()

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.dataset_dir = self._locate()
        self.train, self.query, self.gallery = self._load()

    def _locate(self) -> Path:
        """``root`` itself or one of its alias sub-folders, whichever has the layout."""
        candidates = [self.root, *(self.root / a for a in self.aliases)]
        for cand in candidates:
            if all((cand / r).exists() for r in self.required):
                return cand
        # Report against the most promising candidate: an existing alias folder, else root.
        best = next((c for c in candidates[1:] if c.is_dir()), self.root)
        if not best.is_dir():
            raise DatasetLayoutError(f"{self.name}: missing dataset folder {best}")
        missing = next(best / r for r in self.required if not (best / r).exists())
        raise DatasetLayoutError(f"{self.name}: missing {missing}")

    def _load(self) -> tuple[list[ImageRecord], list[ImageRecord], list[ImageRecord]]:
        raise NotImplementedError

    def require(self, path: Path) -> Path:
        if not path.exists():
            raise DatasetLayoutError(f"{self.name}: missing {path}")
        return path

    @staticmethod
    def images(folder: Path) -> list[Path]:
        """Image files directly in ``folder``, sorted for a stable order."""
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)

    @property
    def num_train_pids(self) -> int:
        return len({r.pid for r in self.train})

    @property
    def num_train_cams(self) -> int:
        return len({r.camid for r in self.train})

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, train={len(self.train)}, "
            f"query={len(self.query)}, gallery={len(self.gallery)})"
        )
