"""Step 1 (our venv): the seeded release folder and the inputs for the official run.

Writes OUT/release/ (save_released: config.json, safetensors with the fused transformers-4.36
Phi attention, tokenizer files) and OUT/inputs.npz (the image, the four cases and the
digests). Usage: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/official_forward/make_release.py
OUT``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "model"))

from test_official_forward import (  # noqa: E402
    ARCH,
    CASES,
    image_digest,
    make_image,
    parameter_digest,
    register_config,
    seeded_model,
)

from unigeoseg_backend.model.checkpoint import save_released  # noqa: E402
from unigeoseg_backend.model.prompting import build_prompt  # noqa: E402
from unigeoseg_backend.model.registry import tiny_tokenizer  # noqa: E402


def main(out: Path) -> None:
    register_config()
    model = seeded_model()
    tokenizer = tiny_tokenizer()
    save_released(model, tokenizer, out / "release")
    image = make_image()
    cases = {}
    for case, (task, instruction) in CASES.items():
        prompt = build_prompt(task, instruction, tokenizer)
        cases[case] = {"task": task, "prompt_type": prompt.prompt_type,
                       "instruction": instruction, "input_ids": prompt.input_ids,
                       "refer_ids": prompt.refer_ids}
    np.savez(out / "inputs.npz", image=image, image_sha256=image_digest(image),
             weights_sha256=parameter_digest(model), arch=ARCH,
             cases=json.dumps(cases))
    print(f"wrote {out}/release and {out}/inputs.npz ({len(cases)} cases)")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
