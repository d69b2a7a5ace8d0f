"""UniGeoSeg backend: the local segmentation service, its engines, georeferencing and CLI."""

__version__ = "0.1.0"
