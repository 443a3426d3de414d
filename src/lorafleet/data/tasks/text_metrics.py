"""Text metrics of generated outputs against references: ROUGE-L and corpus BLEU."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["bleu", "rouge_l"]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure of each prediction against its reference, in [0, 1].

    ``rouge-score``'s ``RougeScorer(["rougeL"], use_stemmer=True)``: F of the longest
    common subsequence of lowercased alphanumeric, Porter-stemmed tokens.
    """
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("rouge_l needs at least one prediction")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [
        scorer.score(ref, pred)["rougeL"].fmeasure
        for pred, ref in zip(predictions, references, strict=True)
    ]
    return float(sum(scores) / len(scores))


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (``sacrebleu.corpus_bleu``, one reference each, 13a tokens), in [0, 100]."""
    import sacrebleu

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("bleu needs at least one prediction")
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)

