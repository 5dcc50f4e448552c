"""Text metrics per sample: ROUGE (rouge-score), BLEU (sacrebleu) and exact match.

ROUGE's stock tokenizer keeps only ``[a-z0-9]`` and so scores any non-English answer as empty. We pass
:class:`UnicodeTokenizer` instead: for ASCII text it produces exactly the stock tokens (lower-cased letter/digit
runs, Porter-stemmed when longer than 3 characters), and for other scripts it keeps letters, digits and combining
marks of every script as words (no stemming: the Porter stemmer is English), and splits Chinese/Japanese
characters one by one, since those scripts do not separate words by spaces.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from functools import lru_cache

from rouge_score import tokenizers

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
# Every per-sample text metric, in report order. ROUGE and exact match are in [0, 1]; BLEU is in [0, 100]
# (sacrebleu's scale).
TEXT_METRICS = ROUGE_TYPES + ("bleu", "exact_match")
METRIC_LABELS = {
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "rougeL": "ROUGE-L",
    "rougeLsum": "ROUGE-Lsum",
    "bleu": "BLEU",
    "exact_match": "EM",
}

# Han ideographs (BMP and supplementary planes), hiragana and katakana: one token per character.
_CJK_CHAR = re.compile("([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f])")


def _is_word_char(char: str) -> bool:
    # Letters, numbers and combining marks. Python's `\w` misses combining marks, which would cut words
    # of Devanagari, Thai, Arabic with diacritics, ... into pieces.
    return unicodedata.category(char)[0] in "LNM"


class UnicodeTokenizer(tokenizers.Tokenizer):
    """rouge-score tokenizer that keeps non-ASCII words (see the module docstring)."""

    def __init__(self, use_stemmer: bool = True):
        from nltk.stem import porter  # rouge-score's own dependency

        self._stemmer = porter.PorterStemmer() if use_stemmer else None

    def tokenize(self, text: str) -> list[str]:
        text = _CJK_CHAR.sub(r" \1 ", unicodedata.normalize("NFC", text).lower())
        words = ("".join(run) for is_word, run in itertools.groupby(text, key=_is_word_char) if is_word)
        return [self._stem(word) for word in words]

    def _stem(self, word: str) -> str:
        # Same rule as rouge-score's default tokenizer: only words longer than 3 characters are stemmed.
        if self._stemmer is not None and len(word) > 3 and word.isascii():
            return self._stemmer.stem(word)
        return word


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=UnicodeTokenizer(use_stemmer=True))


@lru_cache(maxsize=1)
def _sentence_bleu():
    from sacrebleu.metrics import BLEU

    # effective_order: a short answer with no matching 4-gram is not scored 0 outright (sacrebleu's advice
    # for sentence-level BLEU).
    return BLEU(effective_order=True)


def normalize_whitespace(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when equal after NFC and whitespace normalisation (runs of whitespace -> one space, stripped); case counts."""
    return float(normalize_whitespace(prediction) == normalize_whitespace(reference))


def sentence_bleu(prediction: str, reference: str) -> float:
    return _sentence_bleu().sentence_score(prediction, [reference]).score


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu defaults, 13a tokenization), 0-100; the headline BLEU of a model."""
    from sacrebleu.metrics import BLEU

    if not predictions:
        return float("nan")
    return BLEU().corpus_score(predictions, [references]).score


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """F-measure of ROUGE-1/2/L/Lsum (Lsum splits sentences on newlines, as rouge-score does)."""
    scores = _rouge_scorer().score(reference, prediction)
    return {name: scores[name].fmeasure for name in ROUGE_TYPES}


def score_sample(prediction: str, reference: str) -> dict[str, float]:
    """Every per-sample metric of TEXT_METRICS for one output."""
    return {
        **rouge(prediction, reference),
        "bleu": sentence_bleu(prediction, reference),
        "exact_match": exact_match(prediction, reference),
    }
