"""UniGeoSeg (Ni et al., 2025), clean-room: one module per component.

Every component's parameter names follow the released checkpoint's state dict (the
manifests in ``manifests/``); ``conversion.py`` holds the two differences (the ``heads``
prefix, the fused q/k/v of transformers 4.36), so a release loads strictly.

Layout: ``unigeoseg.py`` (the assembled model: inference ``encode_images``/``segment`` and the
training ``forward``), ``swin.py``, ``connector.py``, ``language.py`` (Phi-1.5),
``heads.py`` (TATE, LKM, SEG query), ``pixel_decoder.py``/``ms_deform_attn.py``,
``mask_decoder.py``, ``prompting.py`` (tokenised prompts and labels), ``preprocess.py``
(letterbox), ``cuda_graphs.py``, ``registry.py`` (named configs), ``manifest.py``;
checkpoints: ``conversion.py`` (names), ``weight_files.py`` (reading, strict comparison),
``release_config.py`` (config.json), ``checkpoint.py`` (load/save of a release folder),
``components.py`` (a training start from Mask2Former and Phi-1.5 files); ``recompute.py``
(gradient checkpointing).
"""
