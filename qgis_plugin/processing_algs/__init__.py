"""UniGeoSeg's QGIS Processing provider (``unigeoseg:segmentbypoints``,
``unigeoseg:segmentbytext``).

Register it with ``QgsApplication.processingRegistry().addProvider(UniGeoSegProvider())`` and
remove it with ``removeProvider`` when the plugin unloads.
"""

from .provider import UniGeoSegProvider

__all__ = ["UniGeoSegProvider"]
