"""Word features for a learned head: TF-IDF over word uni- and bigrams, with a fixed vocabulary.

A sentence embedding of a long post blurs single words; slurs, explicit terms and
telling phrases are lexical signals. A head trained with words (``sieve routes build
--head --head-words``) scores a text on its vector and on these features together. The
vocabulary and the inverse document frequencies are fitted on the head's training texts
and stored in the head file, so the worker and ``sieve eval`` compute the same features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

NGRAMS = (1, 2)
MAX_WORDS = 20_000
MIN_TEXTS = 2  # a word or bigram in fewer training texts is left out


@dataclass(frozen=True)
class WordFeatures:
    """``vocabulary[i]`` has inverse document frequency ``idf[i]``; features are l2-normalised."""

    vocabulary: tuple[str, ...]
    idf: np.ndarray
    _vectorizer: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.vocabulary) != len(self.idf):
            raise ValueError(f"{len(self.vocabulary)} words but {len(self.idf)} idf values")
        object.__setattr__(self, "_vectorizer", _vectorizer(
            {word: i for i, word in enumerate(self.vocabulary)}, np.asarray(self.idf, dtype=np.float64)))

    def __len__(self) -> int:
        return len(self.vocabulary)

    def transform(self, texts: Sequence[str]) -> Any:
        """A ``(len(texts), len(self))`` sparse float32 matrix."""
        return self._vectorizer.transform(list(texts))

    @classmethod
    def fit(cls, texts: Sequence[str]) -> WordFeatures:
        """The vocabulary (at most ``MAX_WORDS``, each in at least ``MIN_TEXTS`` texts) and its idf."""
        from sklearn.feature_extraction.text import TfidfVectorizer

        fitted = TfidfVectorizer(ngram_range=NGRAMS, min_df=MIN_TEXTS if len(texts) > 1 else 1,
                                 max_features=MAX_WORDS, sublinear_tf=True, dtype=np.float32)
        try:
            fitted.fit(list(texts))
        except ValueError:  # no word in enough texts: an empty vocabulary
            return cls((), np.zeros(0, dtype=np.float32))
        vocabulary = tuple(str(word) for word in fitted.get_feature_names_out())
        return cls(vocabulary, fitted.idf_.astype(np.float32))


def _vectorizer(vocabulary: dict[str, int], idf: np.ndarray) -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer

    if not vocabulary:
        return _Empty()
    vectorizer = TfidfVectorizer(ngram_range=NGRAMS, vocabulary=vocabulary, sublinear_tf=True,
                                 dtype=np.float32)
    vectorizer.idf_ = idf
    return vectorizer


class _Empty:
    """Features of an empty vocabulary: no columns."""

    def transform(self, texts: list[str]) -> Any:
        from scipy.sparse import csr_matrix

        return csr_matrix((len(texts), 0), dtype=np.float32)
