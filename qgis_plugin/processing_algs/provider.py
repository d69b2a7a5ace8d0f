"""The UniGeoSeg Processing provider: segmentation algorithms usable from the toolbox, the
graphical modeler, batch mode and ``processing.run("unigeoseg:…")``.

Loading it needs only QGIS: pyzmq is imported when an algorithm runs (see
backend_session.py).
"""

from __future__ import annotations

from pathlib import Path

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from .base import tr
from .finetune import FineTuneModelAlgorithm
from .segment_points import SegmentByPointsAlgorithm
from .segment_text import SegmentByTextAlgorithm

_HERE = Path(__file__).resolve().parent
#: Where the plugin's icons may be: next to this package, in the plugin, or in the repository.
ICON_DIRS = (_HERE / "icons", _HERE.parent / "icons", _HERE.parent.parent / "icons")
ICON_NAMES = ("unigeoseg.svg", "icon.svg", "unigeoseg.png", "icon.png")


def find_icon_path() -> Path | None:
    """The plugin icon file, or None when the plugin ships none (yet)."""
    for folder in ICON_DIRS:
        for name in ICON_NAMES:
            if (folder / name).is_file():
                return folder / name
    for folder in ICON_DIRS:
        if folder.is_dir():
            found = sorted(p for p in folder.iterdir()
                           if p.suffix.lower() in (".svg", ".png") and p.is_file())
            if found:
                return found[0]
    return None


class UniGeoSegProvider(QgsProcessingProvider):
    """Provider id ``unigeoseg``: "Segment by points", "Segment by text prompt" and
    "Fine-tune model"."""

    def __init__(self):
        super().__init__()
        self._icon_path = find_icon_path()

    def id(self) -> str:
        return "unigeoseg"

    def name(self) -> str:
        return "UniGeoSeg"

    def longName(self) -> str:
        return tr("UniGeoSeg: instruction-driven segmentation of remote sensing imagery")

    def icon(self) -> QIcon:
        if self._icon_path is not None:
            return QIcon(str(self._icon_path))
        return super().icon()

    def svgIconPath(self) -> str:
        if self._icon_path is not None and self._icon_path.suffix.lower() == ".svg":
            return str(self._icon_path)
        return super().svgIconPath()

    def loadAlgorithms(self) -> None:
        self.addAlgorithm(SegmentByPointsAlgorithm())
        self.addAlgorithm(SegmentByTextAlgorithm())
        self.addAlgorithm(FineTuneModelAlgorithm())
