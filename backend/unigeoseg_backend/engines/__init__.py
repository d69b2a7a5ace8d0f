"""Segmentation engines behind one interface (``base.Engine``): SAM (``sam``) for points and
boxes, UniGeoSeg (``unigeoseg_engine``) for text and interactive prompts; ``cache`` holds the
byte-bounded LRU cache the Segmenter keeps tiles and embeddings in. An engine registers in
``runtime.ENGINE_CLASSES``."""
