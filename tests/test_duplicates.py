"""Duplicate-content-word metric (Roy's PTQ study) on hand-made texts with hand-counted answers."""
from __future__ import annotations

import pytest

from quantlab.metrics.duplicates import content_words, definition, duplicate_content_words, stop_words, words


def test_stop_list_is_sklearns_pinned_list():
    s = stop_words()
    assert len(s) == 318  # scikit-learn 1.9.1 ENGLISH_STOP_WORDS
    assert {"the", "and", "would", "is"} <= s and "cat" not in s


def test_words_lowercase_and_keep_inner_apostrophes():
    assert words("The cat's HAT, isn't it? 3 dogs-2 birds") == ["the", "cat's", "hat", "isn't", "it", "dogs", "birds"]


def test_hand_counted_text():
    text = "The cat sat on the mat. The cat ate the rat, and the rat ran; cat!"
    # content words: cat sat mat cat ate rat rat ran cat  (the/on/and are stop words)
    assert content_words(text) == ["cat", "sat", "mat", "cat", "ate", "rat", "rat", "ran", "cat"]
    st = duplicate_content_words(text)
    assert (st.n_words, st.n_content, st.n_unique, st.duplicates, st.n_repeated_types) == (16, 9, 6, 3, 2)
    assert st.duplicate_ratio == pytest.approx(3 / 9)


def test_no_repetition_only_stop_words_and_empty_text():
    assert duplicate_content_words("Quantized models generate fluent text quickly").duplicates == 0
    st = duplicate_content_words("the and of to is it the and")
    assert (st.n_words, st.n_content, st.duplicates, st.duplicate_ratio) == (8, 0, 0, 0.0)
    assert duplicate_content_words("").to_dict()["n_words"] == 0


def test_short_words_and_case_are_normalised():
    st = duplicate_content_words("Ox ox OX x y x model Model MODEL")
    # "ox" is kept (2 letters, not a stop word; "go" would be one); "x"/"y" are shorter than min_len=2
    assert content_words("Ox ox OX x y x model Model MODEL") == ["ox", "ox", "ox", "model", "model", "model"]
    assert (st.n_content, st.n_unique, st.duplicates, st.n_repeated_types) == (6, 2, 4, 2)
    assert duplicate_content_words("x x x", min_len=1).duplicates == 2


def test_definition_records_every_parameter():
    d = definition()
    assert d["word_regex"] == "[A-Za-z]+(?:'[A-Za-z]+)?" and d["n_stop_words"] == 318
    assert d["stop_words_version"].startswith("scikit-learn ") and d["scope"] == "continuation only"
