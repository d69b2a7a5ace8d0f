"""Georeferencing: CRSs, tile grids, pixel normalisation, masks to polygons, vector files."""
