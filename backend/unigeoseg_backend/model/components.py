"""UniGeoSeg built from its pretrained parts, as training starts (no UniGeoSeg checkpoint yet).

The official recipe starts from two files:

* a Mask2Former (detectron2) checkpoint, ``model_final_54b88a.pkl`` in the official scripts:
  Swin-B from its ``backbone.*`` tensors (``swin_trans.py: init_weights``, a strict load), the
  pixel decoder and the mask decoder from ``sem_seg_head.pixel_decoder.*`` and
  ``sem_seg_head.predictor.*`` (``llava_phi.py: initial_mask_module``, non-strict there,
  with renames: :data:`MASK2FORMER_RENAMES`);
* Phi-1.5 as a transformers folder (``microsoft/phi-1_5``): the language model and its
  ``lm_head`` weight (UniGeoSeg's lm_head has no bias), the vocabulary resized for ``[PAD]``
  and ``[SEG]`` as SegEarth-R1's training script does (:func:`resize_vocabulary`).

Everything else (connector, TATE/LKM/SEG heads, the tensors Mask2Former lacks) keeps its
random initialisation. Loading is strict with explicit tables: a file tensor that maps to no
model tensor, or a model tensor the file should hold and does not, raises a WeightsError
naming them; the tensors that may differ are listed here by name.

Public API:
    build_from_components(config=None, *, swin_path=None, mask2former_path=None,
                          language_dir=None) -> ComponentsBuild
    load_mask2former(model, path, parts, tensors=None) -> list[ComponentReport]
    load_language(model, folder) -> (ComponentReport, tokenizer)
    resize_vocabulary(weight, base_tokens, pad_rows, random_rows, std) -> Tensor
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import WeightsError
from .conversion import convert_phi_state_dict
from .language import phi_config_from_official
from .prompting import add_special_tokens
from .unigeoseg import UniGeoSeg, UniGeoSegConfig, component_of
from .weight_files import (
    check_layout,
    find_weight_files,
    iter_tensors,
    listing,
    read_headers,
    read_json,
    read_state_file,
)

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

# ====================================================================== Mask2Former

#: Part of UniGeoSeg -> (prefix in a Mask2Former checkpoint, prefix in this model).
MASK2FORMER_PARTS: dict[str, tuple[str, str]] = {
    "vision_tower": ("backbone.", "model.vision_tower."),
    "pixel_decoder": ("sem_seg_head.pixel_decoder.", "pixel_decoder."),
    "predictor": ("sem_seg_head.predictor.", "predictor."),
}

#: Mask2Former names that do not follow the prefix rule (the official ``initial_mask_module``'s
#: renames): detectron2's Conv2d-with-norm is ``nn.Sequential(conv, GroupNorm)`` here.
MASK2FORMER_RENAMES: dict[str, str] = {
    "sem_seg_head.pixel_decoder.adapter_1.weight": "pixel_decoder.adapter_1.0.weight",
    "sem_seg_head.pixel_decoder.adapter_1.norm.weight": "pixel_decoder.adapter_1.1.weight",
    "sem_seg_head.pixel_decoder.adapter_1.norm.bias": "pixel_decoder.adapter_1.1.bias",
    "sem_seg_head.pixel_decoder.layer_1.weight": "pixel_decoder.layer_1.0.weight",
    "sem_seg_head.pixel_decoder.layer_1.norm.weight": "pixel_decoder.layer_1.1.weight",
    "sem_seg_head.pixel_decoder.layer_1.norm.bias": "pixel_decoder.layer_1.1.bias",
}

#: Older names accepted for a Mask2Former name (the official code renames them too): old
#: MaskFormer checkpoints call the learned queries ``static_query``.
MASK2FORMER_ALIASES: dict[str, str] = {
    "sem_seg_head.predictor.static_query.weight": "sem_seg_head.predictor.query_feat.weight",
}

#: Tensors of this model that Mask2Former has not: they keep their initialisation. The two
#: conv biases exist here only (detectron2's normed convs have none: the official init leaves
#: them at zero); the rest are UniGeoSeg's additions to the decoder. A name ending in "." is
#: a module prefix.
NOT_IN_MASK2FORMER = (
    "pixel_decoder.adapter_1.0.bias", "pixel_decoder.layer_1.0.bias",
    "predictor.SEG_query_embed.", "predictor.new_query_embed.", "predictor.SEG_proj.",
    "predictor.CLASS_proj.",
)

#: Mask2Former tensors UniGeoSeg has no place for: the class head (one query, no classes).
NOT_IN_UNIGEOSEG = ("sem_seg_head.predictor.class_embed.",)

#: Buffers computed from the configuration; a file may hold them (then they must agree).
_COMPUTED = ".relative_position_index"


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(name == p or (p.endswith(".") and name.startswith(p)) for p in patterns)


@dataclass(frozen=True)
class ComponentReport:
    """What one part of the model received from one file.

    Attributes:
        part: ``vision_tower``, ``pixel_decoder``, ``predictor`` or ``language``.
        source: the file or folder.
        loaded: this model's tensor names filled from it.
        initialised: this model's tensor names of the part it has no tensor for, by design
            (they keep their initialisation).
        unused: the file's tensor names of the part that were not loaded, by design.
        notes: anything else done (the vocabulary resize).
    """

    part: str
    source: Path
    loaded: tuple[str, ...]
    initialised: tuple[str, ...] = ()
    unused: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        lines = [f"{self.part}: {len(self.loaded)} tensors from {self.source}"]
        if self.initialised:
            lines.append(f"  kept at initialisation: {', '.join(self.initialised)}")
        if self.unused:
            lines.append(f"  not used from the file: {', '.join(self.unused)}")
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)


def _file_name(name: str, source_prefix: str, target_prefix: str) -> str:
    """The Mask2Former name of this model's tensor ``name`` (the inverse of the tables)."""
    for source, target in MASK2FORMER_RENAMES.items():
        if target == name:
            return source
    return source_prefix + name[len(target_prefix):]


@dataclass
class _PartPlan:
    part: str
    targets: dict[str, str]   # file name -> model name
    initialised: list[str]
    unused: list[str]


def load_mask2former(model: UniGeoSeg, path: PathLike, parts: tuple[str, ...],
                     tensors: Mapping[str, Tensor] | None = None) -> list[ComponentReport]:
    """Copy ``parts`` of UniGeoSeg from a Mask2Former checkpoint, strictly.

    Args:
        model: the model to fill (any dtype and device; the values are cast).
        path: a detectron2 ``.pkl`` (numpy arrays), ``.pth`` or ``.safetensors`` holding
            ``backbone.*`` / ``sem_seg_head.*`` names, flat or under ``"model"``.
        parts: keys of :data:`MASK2FORMER_PARTS`.
        tensors: the file's tensors when already read (``read_state_file(path)``).

    Raises:
        WeightsError: for a part, a tensor the file should hold and does not, one it holds
            that maps to nothing, a wrong shape (all in the file's naming), or a Swin
            ``relative_position_index`` other than the standard one. Nothing is copied then.
    """
    path = Path(path)
    tensors = read_state_file(path) if tensors is None else tensors
    state = model.state_dict()
    plans = [_plan(part, path, tensors, state) for part in parts]
    for plan in plans:
        for name, target in plan.targets.items():
            if target.endswith(_COMPUTED) and not torch.equal(tensors[name].cpu(),
                                                              state[target].cpu()):
                raise WeightsError(f"{path}: {name} is not the standard Swin index",
                                   {"path": str(path), "bad_tensor": name})
    with torch.no_grad():
        for plan in plans:
            for name, target in plan.targets.items():
                state[target].copy_(tensors[name])
    return [ComponentReport(plan.part, path, tuple(sorted(plan.targets.values())),
                            tuple(plan.initialised), tuple(plan.unused)) for plan in plans]


def _plan(part: str, path: Path, tensors: Mapping[str, Tensor],
          state: Mapping[str, Tensor]) -> _PartPlan:
    """Which file tensor goes where for one part, checked against the model (strict)."""
    source_prefix, target_prefix = MASK2FORMER_PARTS[part]
    # Mask2Former name -> the name it is stored under (an alias or itself)
    in_part: dict[str, str] = {}
    for stored in (n for n in tensors if n.startswith(source_prefix)):
        name = MASK2FORMER_ALIASES.get(stored, stored)
        if name in in_part:
            raise WeightsError(f"{path} holds both {in_part[name]} and {stored}",
                               {"path": str(path), "duplicate_keys": [in_part[name], stored]})
        in_part[name] = stored
    unused = sorted(n for n in in_part if _matches(n, NOT_IN_UNIGEOSEG))
    targets = {stored: MASK2FORMER_RENAMES.get(n, target_prefix + n[len(source_prefix):])
               for n, stored in in_part.items() if n not in unused}
    ours = [n for n in state if n.startswith(target_prefix)]
    initialised = sorted(n for n in ours if _matches(n, NOT_IN_MASK2FORMER))
    expected = {_file_name(n, source_prefix, target_prefix): (tuple(state[n].shape),
                                                               state[n].dtype)
                for n in ours if n not in initialised}
    header = {n: (tuple(tensors[stored].shape), tensors[stored].dtype)
              for n, stored in in_part.items() if n not in unused}
    for name in expected:  # computed from the configuration: a file may leave them out
        if name.endswith(_COMPUTED):
            header.setdefault(name, expected[name])
    check_layout(path, f"UniGeoSeg's {part}", header, expected)
    return _PartPlan(part, targets, initialised, unused)


# ====================================================================== Phi-1.5

#: The language model's tensors in this model (and in a transformers PhiForCausalLM).
LANGUAGE_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.final_layernorm.",
                     "lm_head.")

#: PhiForCausalLM tensors UniGeoSeg drops: its lm_head has no bias (``UniGeoSeg.__init__``
#: re-creates it), so the official ``from_pretrained`` leaves the bias out.
LANGUAGE_NOT_IN_UNIGEOSEG = ("lm_head.bias",)

#: One row per token: resized to the tokenizer with [PAD] and [SEG] (resize_vocabulary).
VOCABULARY_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")

#: PhiConfig fields that must agree between the folder and the model configuration.
_PHI_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "hidden_act", "layer_norm_eps", "qk_layernorm")
_ROPE_FIELDS = ("partial_rotary_factor", "rope_theta")


def resize_vocabulary(weight: Tensor, base_tokens: int, pad_rows: int, random_rows: int,
                      std: float) -> Tensor:
    """A V0 x d embedding (or lm_head) weight resized as SegEarth-R1's training script does.

    The script adds ``[PAD]`` (when the tokenizer has no pad token) with
    ``smart_tokenizer_and_embedding_resize`` and then ``[SEG]`` with a plain
    ``resize_token_embeddings``. Hence, in order:

    * rows ``[0, base_tokens)`` of the file, one per token of the original tokenizer (the
      resize truncates Phi-1.5's 51200 rows to the tokenizer's 50295);
    * ``pad_rows`` (0 or 1) rows equal to the mean of those rows;
    * ``random_rows`` rows drawn from N(0, std²), std = ``initializer_range``, as
      transformers 4.36 initialises new rows (from the global RNG).

    Returns:
        (base_tokens + pad_rows + random_rows) x d, float32.
    """
    if weight.shape[0] < base_tokens:
        raise WeightsError(f"{weight.shape[0]} vocabulary rows for a tokenizer of "
                           f"{base_tokens} tokens")
    kept = weight[:base_tokens].float()
    mean = kept.mean(dim=0, keepdim=True).expand(pad_rows, -1)
    new = torch.randn(random_rows, weight.shape[1]) * std
    return torch.cat([kept, mean, new])


def _check_language_config(folder: Path, theirs: Mapping[str, Any],
                           ours: Mapping[str, Any]) -> None:
    if theirs.get("model_type") != "phi":
        raise WeightsError(f"{folder} holds model_type {theirs.get('model_type')!r}; a "
                           "transformers Phi folder (model_type 'phi') is expected",
                           {"path": str(folder)})
    folder_config, model_config = phi_config_from_official(theirs), phi_config_from_official(ours)
    differ = {name: (getattr(folder_config, name), getattr(model_config, name))
              for name in _PHI_FIELDS
              if getattr(folder_config, name) != getattr(model_config, name)}
    differ.update({name: (folder_config.rope_parameters.get(name),
                          model_config.rope_parameters.get(name))
                   for name in _ROPE_FIELDS
                   if folder_config.rope_parameters.get(name)
                   != model_config.rope_parameters.get(name)})
    if differ:
        raise WeightsError(f"{folder}/config.json does not describe the model's language "
                           "model: " + ", ".join(f"{name} {a!r} instead of {b!r}"
                                                 for name, (a, b) in differ.items()),
                           {"path": str(folder), "mismatched_fields": list(differ)})


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # OSError, ValueError, ...: no or broken tokenizer files
        raise WeightsError(f"{folder}: cannot load the tokenizer (its token ids choose the "
                           f"vocabulary rows): {exc}", {"path": str(folder)}) from exc


def load_language(model: UniGeoSeg, folder: PathLike) -> tuple[ComponentReport, Any]:
    """Copy Phi-1.5 from a transformers ``PhiForCausalLM`` folder (``save_pretrained``).

    The folder's tokenizer gets ``[PAD]`` and ``[SEG]`` (``prompting.add_special_tokens``),
    and the vocabulary tensors are resized to it (:func:`resize_vocabulary`); it must then
    have exactly the model's ``vocab_size`` tokens. Fused 4.36 ``query_key_value`` tensors
    are split (``conversion.convert_phi_state_dict``); ``lm_head.bias`` is dropped.

    Returns:
        The report, and the tokenizer with ``[PAD]`` and ``[SEG]``.

    Raises:
        WeightsError: no config.json, weights or tokenizer; a configuration whose shapes
            or rotary settings differ from the model's; a tokenizer that does not fit the
            vocabulary; any missing, unexpected or mis-shaped tensor (named).
    """
    folder = Path(folder)
    language = model.config.language
    _check_language_config(folder, read_json(folder / "config.json",
                                             "the language model's configuration"), language)
    tokenizer = _load_tokenizer(folder)
    base_tokens, pad_rows = len(tokenizer), int(tokenizer.pad_token is None)
    add_special_tokens(tokenizer)
    random_rows = len(tokenizer) - base_tokens - pad_rows
    if len(tokenizer) != language["vocab_size"]:
        raise WeightsError(f"{folder}: the tokenizer has {len(tokenizer)} tokens with [PAD] "
                           f"and [SEG], the model's vocabulary {language['vocab_size']}",
                           {"path": str(folder)})

    num_heads = language["num_attention_heads"]
    weights = find_weight_files(folder)
    stored = {name: torch.empty(shape, dtype=dtype or torch.float32, device="meta")
              for name, (shape, dtype) in read_headers(weights).items()}
    header = {name: (tuple(t.shape), t.dtype)
              for name, t in convert_phi_state_dict(stored, num_heads=num_heads).items()}
    state = model.state_dict()
    expected = {n: (tuple(t.shape), t.dtype) for n, t in state.items()
                if n.startswith(LANGUAGE_PREFIXES)}
    for name in VOCABULARY_TENSORS:  # any number of rows; the width must agree
        if name in header:
            expected[name] = ((header[name][0][0], *expected[name][0][1:]), expected[name][1])
            if header[name][0][0] < base_tokens:
                raise WeightsError(f"{folder}: {name} has {header[name][0][0]} rows, the "
                                   f"tokenizer {base_tokens} tokens", {"path": str(folder)})
    check_layout(folder, "UniGeoSeg's language model", header, expected,
                 ignorable=lambda n: n in LANGUAGE_NOT_IN_UNIGEOSEG)

    std = float(language.get("initializer_range", 0.02))
    loaded: list[str] = []
    with torch.no_grad():
        for file in weights.files:
            for name, tensor in iter_tensors(file, weights.kind):
                for target, value in convert_phi_state_dict({name: tensor},
                                                            num_heads=num_heads).items():
                    if target in LANGUAGE_NOT_IN_UNIGEOSEG:
                        continue
                    if target in VOCABULARY_TENSORS:
                        value = resize_vocabulary(value, base_tokens, pad_rows, random_rows, std)
                    state[target].copy_(value)
                    loaded.append(target)
    note = (f"vocabulary: rows 0..{base_tokens - 1} from the folder"
            + (", [PAD] = their mean" if pad_rows else "")
            + (f", {random_rows} new row(s) ([SEG]) from N(0, {std}²)" if random_rows else "")
            + f": {len(tokenizer)} rows")
    unused = tuple(n for n in header if n in LANGUAGE_NOT_IN_UNIGEOSEG)
    return ComponentReport("language", folder, tuple(sorted(loaded)), unused=unused,
                           notes=(note,)), tokenizer


# ====================================================================== the whole model


@dataclass
class ComponentsBuild:
    """A model started from components.

    Attributes:
        model: UniGeoSeg on the CPU in float32, in training mode (``nn.Module``'s default).
        tokenizer: the language folder's tokenizer with ``[PAD]`` and ``[SEG]``, or None.
        reports: one per part loaded, in loading order.
    """

    model: UniGeoSeg
    tokenizer: Any
    reports: list[ComponentReport]

    def random_parameters(self) -> dict[str, list[str]]:
        """The parameters no file provided (random initialisation), by
        ``trainable_parameter_groups`` group."""
        loaded = {name for report in self.reports for name in report.loaded}
        groups: dict[str, list[str]] = {}
        for name, _ in self.model.named_parameters():
            if name not in loaded:
                groups.setdefault(component_of(name), []).append(name)
        return groups

    def summary(self) -> str:
        lines = [report.summary() for report in self.reports]
        random = self.random_parameters()
        lines.append("randomly initialised: " + ("nothing" if not random else "; ".join(
            f"{group} {len(names)} ({listing(names)})" for group, names in random.items())))
        return "\n".join(lines)


def build_from_components(config: UniGeoSegConfig | None = None, *,
                          swin_path: PathLike | None = None,
                          mask2former_path: PathLike | None = None,
                          language_dir: PathLike | None = None) -> ComponentsBuild:
    """UniGeoSeg with random weights, then the given pretrained parts loaded strictly.

    Args:
        config: the architecture (default: the released model's).
        swin_path: a Mask2Former checkpoint whose ``backbone.*`` is the Swin
            (``model_final_54b88a.pkl`` in the official scripts; .pkl, .pth or .safetensors).
        mask2former_path: a Mask2Former checkpoint for the pixel decoder and the mask decoder
            (``sem_seg_head.*``); officially the same file. A file given twice is read once.
        language_dir: a transformers Phi folder (weights, config.json, tokenizer), e.g.
            ``microsoft/phi-1_5``.

    Returns:
        :class:`ComponentsBuild`: the model, the tokenizer (None without ``language_dir``),
        and what came from where (its ``summary()`` is logged).

    Raises:
        WeightsError: see :func:`load_mask2former` and :func:`load_language`.
    """
    model = UniGeoSeg(config or UniGeoSegConfig())
    reports: list[ComponentReport] = []
    read: dict[Path, dict[str, Tensor]] = {}  # the official recipe reads one file twice
    for path, parts in ((swin_path, ("vision_tower",)),
                        (mask2former_path, ("pixel_decoder", "predictor"))):
        if path is None:
            continue
        key = Path(path).resolve()
        if key not in read:
            read[key] = read_state_file(key)
        reports += load_mask2former(model, path, parts, read[key])
    del read
    tokenizer = None
    if language_dir is not None:
        report, tokenizer = load_language(model, language_dir)
        reports.append(report)
    build = ComponentsBuild(model, tokenizer, reports)
    logger.info("UniGeoSeg from components:\n%s", build.summary())
    return build
