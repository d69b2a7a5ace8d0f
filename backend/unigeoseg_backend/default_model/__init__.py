"""Building blocks of the embedded default model, a small prompt-conditioned segmenter
trained only on imagery and a text model that registry packages ship (docs/default-model.md).

- ``sources``: where those packages' files are and how to read the scenes (rasterio).
- ``references``: the rule-based reference labels (water, vegetation, clouds, lakes, trees).
- ``regions``: which pixel windows of each scene may be trained on and which are kept for
  evaluation.
- ``text_encoder``: all-MiniLM-L6-v2 sentence embeddings and the vocabulary of classes an
  instruction is matched to.
"""
