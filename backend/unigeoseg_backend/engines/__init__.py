"""Segmentation engines (SAM for clicks; UniGeoSeg for text arrives with its issue)."""
