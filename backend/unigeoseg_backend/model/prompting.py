"""Prompt template, special tokens and interactive coordinates of the released UniGeoSeg code.

Reproduces, without copying, ``unigeoseg/constants.py``, the ``llava_phi`` template of
``unigeoseg/conversation.py`` and the prompt/label builders of
``unigeoseg/eval_and_test/eval_dataset/RS_val_dataset.py`` (MiliLab/UniGeoSeg @73abc28), plus
the tokenizer additions of SegEarth-R1's ``train.py``.

The rendered conversation (llava_phi = LLaMA-2 separators, ``<|endoftext|>`` as sep/sep2)::

    [INST] <<SYS>>\\n{SYSTEM_PROMPT}\\n<</SYS>>\\n\\nThis is an image <image>, Please doing
    {Reasoning|Referring} Segmentation according to the following instruction:\\n<refer>
    [/INST] {response} <|endoftext|>

(one line in reality). The placeholders become negative ids that the model replaces by
embeddings: ``<image>`` by the visual tokens, ``<refer>`` by ``embed(refer_ids)``,
``<answer>`` by ``embed(answer_ids)``; ``<seg>`` is dropped (``use_seg_query=False``).

The task is explicit here (the official eval guesses it from ``/ref/`` or ``/intera/`` in the
image path). Which wording a task gets is the *template* choice: GeoSeg-Bench asks every task,
interactive and referring included, with the Reasoning wording.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from unigeoseg_protocol.vocabulary import TASKS

from ..errors import InvalidInputError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
SEG_TOKEN_INDEX = -201
REFER_TOKEN_INDEX = -204
ANSWER_TOKEN_INDEX = -205

#: Placeholder text -> the id it becomes in ``input_ids``.
PLACEHOLDER_IDS = {
    "<image>": IMAGE_TOKEN_INDEX,
    "<seg>": SEG_TOKEN_INDEX,
    "<refer>": REFER_TOKEN_INDEX,
    "<answer>": ANSWER_TOKEN_INDEX,
}
_PLACEHOLDER_SPLIT = re.compile("(<image>|<seg>|<refer>|<answer>)")

SEG_TOKEN = "[SEG]"
PAD_TOKEN = "[PAD]"
#: Phi-1.5's bos/eos/unk; also the llava_phi template's separators.
EOS_TOKEN = "<|endoftext|>"

SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
_INST_CLOSE = "[/INST] "  # splits a round into instruction and response (label masking)


#: Task name (``unigeoseg_protocol.vocabulary.TASKS``) -> the official ``prompt_type``.
PROMPT_TYPES = {"referring": "ref", "reasoning": "reason", "interactive": "intera"}


class PromptTemplate(str, Enum):
    """Wording of the conversation, one per official dataset class."""

    GEOSEG_BENCH = "geoseg_bench"  #: RSRSDataset: Reasoning wording for all three tasks
    EARTHREASON = "earthreason"    #: ReasonSegDataset: same text; empty answer gets a sentence
    REFSEGRS = "refsegrs"          #: RefSegRSDataset
    RRSISD = "rrsisd"              #: RRSISDDataset


@dataclass(frozen=True)
class _TemplateSpec:
    task_word: str        #: "Please doing {task_word} Segmentation ..."
    response: str         #: assistant turn, with placeholders
    dataset_type: str     #: 'reason_seg' (CE loss on the response) or 'refer_seg' (none)
    empty_answer: str | None  #: what replaces an empty answer; None: no <answer> slot


_TEMPLATES = {
    PromptTemplate.GEOSEG_BENCH: _TemplateSpec("Reasoning", "Sure, It is <seg>. \n<answer>.",
                                               "reason_seg", ""),
    PromptTemplate.EARTHREASON: _TemplateSpec("Reasoning", "Sure, It is <seg>. \n<answer>.",
                                              "reason_seg",
                                              "There is no target object in the image."),
    PromptTemplate.REFSEGRS: _TemplateSpec("Referring", "\nSure. It is <seg>. ", "refer_seg",
                                           None),
    PromptTemplate.RRSISD: _TemplateSpec("Referring", "\nSure.", "refer_seg", None),
}


@dataclass(frozen=True)
class TokenizedPrompt:
    """One tokenised UniGeoSeg prompt.

    Attributes:
        task: the explicit task, a name of ``unigeoseg_protocol.vocabulary.TASKS``; it
            selects the TATE branch and the LKM weight.
        template: the wording used.
        text: rendered conversation with the placeholders still as text.
        input_ids: token ids with placeholder ids (IMAGE_TOKEN_INDEX, ...) in place.
        labels: input_ids with IGNORE_INDEX on the user turn (official preprocess_llama2).
        refer_ids: what ``<refer>`` expands to: tokenize(" " + instruction) + [id([SEG])].
        answer_ids: what ``<answer>`` expands to: tokenize(answer) + [id([SEG])]; None when
            the template has no ``<answer>``.
        dataset_type: 'reason_seg' or 'refer_seg'.
        intera_coords: parse_interactive_coords(instruction) for the interactive task
            (normalised; box 1x4 XYXY or points Nx2 XY), else None.
    """

    task: str
    template: PromptTemplate
    text: str
    input_ids: list[int]
    labels: list[int]
    refer_ids: list[int]
    answer_ids: list[int] | None
    dataset_type: str
    intera_coords: torch.Tensor | None

    @property
    def prompt_type(self) -> str:
        """The official ``prompt_type`` string: ``'ref'``, ``'reason'`` or ``'intera'``."""
        return PROMPT_TYPES[self.task]


def add_special_tokens(tokenizer: Any) -> int:
    """Add ``[PAD]`` (as pad token) and ``[SEG]`` (plain added token) like SegEarth-R1.

    Order matters for the ids: on Phi-1.5's 50295-token vocabulary ``[PAD]`` becomes 50295 and
    ``[SEG]`` 50296 (vocab 50297). As in the training script, the pad token is only added when
    the tokenizer has none, and ``[SEG]`` is not special. Idempotent.

    Returns:
        How many tokens were added; resize the embeddings to ``len(tokenizer)`` if > 0.
    """
    added = 0
    if tokenizer.pad_token is None:
        added += tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    added += tokenizer.add_tokens(SEG_TOKEN)
    return added


def seg_token_id(tokenizer: Any) -> int:
    """The id of ``[SEG]``; raises if it is not one added token.

    (Without the added token, the official ``encode('[SEG]')[0]`` silently returns the id of
    ``[``.)
    """
    ids = tokenizer.encode(SEG_TOKEN, add_special_tokens=False)
    if len(ids) != 1:
        raise InvalidInputError(f"tokenizer splits {SEG_TOKEN} into {ids}; "
                                "call add_special_tokens(tokenizer) first")
    return int(ids[0])


def render_prompt(template: PromptTemplate | str = PromptTemplate.GEOSEG_BENCH) -> str:
    """The conversation text of ``template`` (placeholders unexpanded)."""
    spec = _TEMPLATES[PromptTemplate(template)]
    user = ("This is an image <image>, Please doing " + spec.task_word
            + " Segmentation according to the following instruction:\n<refer>")
    # LLaMA-2 style: sep + "[INST] <<SYS>>...<</SYS>>\n\n{user} [/INST]" + " {resp} " + sep2,
    # then the leading sep is stripped.
    first = f"[INST] <<SYS>>\n{SYSTEM_PROMPT}\n<</SYS>>\n\n{user} [/INST]"
    return first + " " + spec.response + " " + EOS_TOKEN


def tokenize_with_placeholders(text: str, tokenizer: Any) -> list[int]:
    """Token ids of ``text``, each placeholder as its negative id (``tokenizer_special_tokens``).

    Every chunk between placeholders is encoded on its own, without special tokens.
    """
    ids: list[int] = []
    for chunk in _PLACEHOLDER_SPLIT.split(text):
        if chunk in PLACEHOLDER_IDS:
            ids.append(PLACEHOLDER_IDS[chunk])
        elif chunk:
            ids.extend(tokenizer.encode(chunk, add_special_tokens=False))
    return ids


def _official_labels(text: str, input_ids: list[int], tokenizer: Any) -> list[int]:
    """Label masking of ``preprocess_llama2``, literally (including its BOS-era offsets).

    Position 0 and the first ``len(tok(user turn + "[/INST] ")) - 2`` ids after it are
    ignored; the response and the final ``<|endoftext|>`` are kept. A length mismatch ignores
    everything, as the official code does (with a warning).
    """
    labels = list(input_ids)
    pad_id = tokenizer.pad_token_id
    total_len = sum(1 for i in input_ids if i != pad_id)
    cur_len = 1
    labels[:cur_len] = [IGNORE_INDEX] * min(cur_len, len(labels))
    for rou in text.split(EOS_TOKEN):
        if rou == "":
            break
        parts = rou.split(_INST_CLOSE)
        if len(parts) != 2:
            break
        round_len = len(tokenize_with_placeholders(rou, tokenizer))
        instruction_len = len(tokenize_with_placeholders(parts[0] + _INST_CLOSE, tokenizer)) - 2
        end = min(cur_len + instruction_len, len(labels))
        labels[cur_len:end] = [IGNORE_INDEX] * max(0, end - cur_len)
        cur_len += round_len
    labels[cur_len:] = [IGNORE_INDEX] * max(0, len(labels) - cur_len)
    if cur_len < tokenizer.model_max_length and cur_len != total_len:
        logger.warning("tokenization mismatch: %d vs. %d (labels ignored)", cur_len, total_len)
        labels = [IGNORE_INDEX] * len(labels)
    return labels


def build_prompt(
    task: str,
    instruction: str,
    tokenizer: Any,
    *,
    template: PromptTemplate | str = PromptTemplate.GEOSEG_BENCH,
    answer: str | None = None,
) -> TokenizedPrompt:
    """Tokenised prompt for one instruction.

    Args:
        task: "referring", "reasoning" or "interactive". Only sets ``prompt_type`` and, for
            interactive, ``intera_coords``; the wording comes from ``template``.
        instruction: the user's text (interactive: with the coordinates, see
            interactive_instruction).
        tokenizer: a tokenizer on which add_special_tokens() has been called.
        template: default GEOSEG_BENCH (the Reasoning wording for every task, as the benchmark
            eval does). REFSEGRS / RRSISD reproduce those datasets' Referring prompts.
        answer: reason text for ``<answer>`` (templates that have it); None or "" gives the
            template's empty answer.
    """
    if task not in TASKS:
        raise InvalidInputError(f"unknown task {task!r}; expected one of {TASKS}")
    template = PromptTemplate(template)
    spec = _TEMPLATES[template]
    # An empty instruction never gets here: requests are refused by Prompt.from_wire (wire)
    # and Capabilities.check (engine API), dataset samples by their readers.
    if spec.empty_answer is None and answer:
        raise InvalidInputError(f"template {template.value} has no <answer> slot")

    seg_id = seg_token_id(tokenizer)
    text = render_prompt(template)
    input_ids = tokenize_with_placeholders(text, tokenizer)
    refer_ids = tokenizer.encode(" " + instruction, add_special_tokens=False) + [seg_id]
    answer_ids = None
    if spec.empty_answer is not None:
        answer_text = answer if answer else spec.empty_answer
        answer_ids = tokenizer.encode(answer_text, add_special_tokens=False) + [seg_id]
    coords = parse_interactive_coords(instruction) if task == "interactive" else None
    return TokenizedPrompt(task=task, template=template, text=text, input_ids=input_ids,
                  labels=_official_labels(text, input_ids, tokenizer), refer_ids=refer_ids,
                  answer_ids=answer_ids, dataset_type=spec.dataset_type, intera_coords=coords)


# --- interactive coordinates -------------------------------------------------------------

#: The official patterns, unchanged. ``[\d.]+`` admits no sign and no exponent, and the
#: comma inside the brackets must not be followed by a space.
BOX_PATTERN = re.compile(r"x0,y0=\[([\d.]+),([\d.]+)\],\s*x1,y1=\[([\d.]+),([\d.]+)\]")
POINT_PATTERN = re.compile(r"\[([\d.]+),([\d.]+)\]")
MAX_POINTS = 3

_INTERACTIVE_LEAD = "Please segment the region/target corresponding to the"


def _fmt(v: float) -> str:
    return f"{v:.3f}"


def _check_unit(values: Sequence[float], what: str) -> list[float]:
    out = [float(v) for v in values]
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in out):
        raise InvalidInputError(f"{what} must be normalised to [0, 1]; got {out}")
    return out


def interactive_instruction(
    points_norm: Sequence[Sequence[float]] | None = None,
    box_norm: Sequence[float] | None = None,
) -> str:
    """The benchmark's interactive instruction for points or a box (exactly one).

    Coordinates are fractions of the image width (X, right) and height (Y, down), written with
    three decimals and no space after the comma, so parse_interactive_coords reads them back:

    - one point: ``"Please segment the region/target corresponding to the point [0.490,0.828]."``
    - box (XYXY): ``"... corresponding to the box x0,y0=[0.434,0.113], x1,y1=[0.717,0.287]."``
    - 2-3 points (wording not seen in the official data; ours):
      ``"... corresponding to the points [0.100,0.200], [0.300,0.400]."``

    Args:
        points_norm: Nx2 (X, Y) in [0, 1], 1 <= N <= 3 (the parser rejects more).
        box_norm: (x0, y0, x1, y1) in [0, 1], x0 <= x1 and y0 <= y1.
    """
    if (points_norm is None) == (box_norm is None):
        raise InvalidInputError("give exactly one of points_norm and box_norm")
    if box_norm is not None:
        x0, y0, x1, y1 = _check_unit(list(box_norm), "box_norm")
        if x0 > x1 or y0 > y1:
            raise InvalidInputError(f"box_norm must be XYXY with x0<=x1, y0<=y1; got {box_norm}")
        return (f"{_INTERACTIVE_LEAD} box x0,y0=[{_fmt(x0)},{_fmt(y0)}], "
                f"x1,y1=[{_fmt(x1)},{_fmt(y1)}].")
    assert points_norm is not None
    points = [_check_unit(list(p), "points_norm") for p in points_norm]
    if not 1 <= len(points) <= MAX_POINTS or any(len(p) != 2 for p in points):
        raise InvalidInputError(f"points_norm must be Nx2 with 1 <= N <= {MAX_POINTS}; "
                                f"got {points}")
    text = ", ".join(f"[{_fmt(x)},{_fmt(y)}]" for x, y in points)
    noun = "point" if len(points) == 1 else "points"
    return f"{_INTERACTIVE_LEAD} {noun} {text}."


def parse_interactive_coords(text: str) -> torch.Tensor | None:
    """Coordinates in an interactive instruction, as the official ``extract_intera_coords``.

    The box pattern is tried first and gives a 1x4 tensor (x0, y0, x1, y1). Otherwise every
    ``[x,y]`` is collected; 1-3 of them give an Nx2 tensor. Anything else gives None, which
    TATE treats as zeros. Quirks kept on purpose, since the checkpoint was trained with them:

    - ``[0.49, 0.828]`` (space after the comma) does not match, so yields None;
    - negative numbers never match (no sign in ``[\\d.]+``);
    - 4 or more points give None, not the first three;
    - a box whose inner comma has a space falls through to the point pattern, and the
      well-formed corner alone comes back as one point;
    - values are not clipped to [0, 1].

    Raises:
        InvalidInputError: a matched number is not a float (``[1.2.3,0.5]``; the official code
            crashes with ValueError there).
    """
    try:
        box = BOX_PATTERN.search(text)
        if box:
            return torch.tensor([[float(box.group(i)) for i in range(1, 5)]])
        points = POINT_PATTERN.findall(text)
        if 1 <= len(points) <= MAX_POINTS:
            return torch.tensor([[float(x), float(y)] for x, y in points])
    except ValueError as exc:
        raise InvalidInputError(f"malformed coordinate in {text!r}: {exc}") from exc
    return None
