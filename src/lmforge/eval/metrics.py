"""Task metrics, computed by the libraries the field reports them with.

Text (0-100, as the field reports them):
- BLEU and chrF: sacrebleu's corpus scores (13a tokenization; chrF with character 6-grams and beta 2).
- ROUGE-1, ROUGE-2, ROUGE-L: rouge-score's F-measure (with its Porter stemmer), averaged over the examples.
- Exact match and token F1: the SQuAD definitions: answers are lowercased, and punctuation, the articles a/an/the
  and extra whitespace are removed; token F1 is the harmonic mean of precision and recall of the shared tokens.
An example may have several references: exact match, F1 and ROUGE take the best one; BLEU and chrF count them all.

Classification (0-1, as scikit-learn reports them): accuracy; precision, recall and F1 per class and their
macro averages; ROC-AUC (binary: of the second label's probability; more labels: one-vs-rest, macro-averaged) with
the ROC curve points; the confusion matrix (rows: true labels, columns: predicted).
"""

from __future__ import annotations

import re
import string
from collections import Counter

import numpy as np

from lmforge.errors import LMForgeError


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise LMForgeError(f"task metrics need {module.split('.')[0]}; pip install 'lmforge[metrics]'") from exc


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: list[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(r) for r in references))


def token_f1(prediction: str, references: list[str]) -> float:
    """The best token F1 of prediction against any reference (SQuAD)."""

    def f1(reference: str) -> float:
        predicted, wanted = normalize_answer(prediction).split(), normalize_answer(reference).split()
        if not predicted or not wanted:
            return float(predicted == wanted)
        common = sum((Counter(predicted) & Counter(wanted)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(predicted), common / len(wanted)
        return 2 * precision * recall / (precision + recall)

    return max(f1(r) for r in references)


def text_metrics(predictions: list[str], references: list[list[str]]) -> dict:
    """BLEU, chrF, ROUGE-1/2/L, exact match and token F1 of predictions against their references (0-100)."""
    if len(predictions) != len(references) or not predictions:
        raise LMForgeError("text metrics need one list of references per prediction, and at least one prediction")
    sacrebleu = _need("sacrebleu")
    rouge_scorer = _need("rouge_score.rouge_scorer")
    width = max(len(refs) for refs in references)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rouge = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for prediction, refs in zip(predictions, references):
        scores = scorer.score_multi(refs, prediction)
        for name in rouge:
            rouge[name] += scores[name].fmeasure
    n = len(predictions)
    return {
        "bleu": sacrebleu.corpus_bleu(predictions, streams).score,
        "chrf": sacrebleu.corpus_chrf(predictions, streams).score,
        **{name: 100 * total / n for name, total in rouge.items()},
        "exact_match": 100 * sum(exact_match(p, r) for p, r in zip(predictions, references)) / n,
        "token_f1": 100 * sum(token_f1(p, r) for p, r in zip(predictions, references)) / n,
        "examples": n,
    }


def classification_metrics(y_true: list[int], probabilities: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, per-class and macro precision/recall/F1, ROC-AUC with curve points, confusion matrix."""
    metrics = _need("sklearn.metrics")
    y_true = np.asarray(y_true)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    y_pred = probabilities.argmax(axis=1)
    ids = list(range(len(labels)))
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        y_true, y_pred, labels=ids, zero_division=0
    )
    macro = metrics.precision_recall_fscore_support(y_true, y_pred, labels=ids, average="macro", zero_division=0)
    result = {
        "accuracy": float(metrics.accuracy_score(y_true, y_pred)),
        "macro_precision": float(macro[0]),
        "macro_recall": float(macro[1]),
        "macro_f1": float(macro[2]),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(labels, precision, recall, f1, support)
        },
        "confusion_matrix": metrics.confusion_matrix(y_true, y_pred, labels=ids).tolist(),
        "labels": list(labels),
        "examples": int(len(y_true)),
    }
    present = set(y_true.tolist())
    if len(labels) == 2 and present == {0, 1}:
        fpr, tpr, _ = metrics.roc_curve(y_true, probabilities[:, 1])
        result["roc_auc"] = float(metrics.roc_auc_score(y_true, probabilities[:, 1]))
        result["roc_curves"] = {labels[1]: {"fpr": fpr.tolist(), "tpr": tpr.tolist()}}
    elif len(labels) > 2 and present == set(ids):
        result["roc_auc"] = float(
            metrics.roc_auc_score(y_true, probabilities, multi_class="ovr", average="macro", labels=ids)
        )
        result["roc_curves"] = {}
        for i, name in enumerate(labels):
            fpr, tpr, _ = metrics.roc_curve(y_true == i, probabilities[:, i])
            result["roc_curves"][name] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    else:
        result["roc_auc"] = None  # undefined unless every label occurs among the true labels
        result["roc_curves"] = {}
    return result
