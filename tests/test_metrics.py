"""Task metrics against values computed by hand on small cases."""

import math

import numpy as np
import pytest

from lmforge.errors import LMForgeError
from lmforge.eval.metrics import classification_metrics, exact_match, normalize_answer, text_metrics, token_f1


def test_bleu_by_hand():
    # hypothesis "the cat sat on the mat", reference "the cat sat on a mat": equal lengths, so no brevity penalty.
    # n-gram precisions: 5/6, 3/5, 2/4, 1/3; BLEU = geometric mean = (5/6 * 3/5 * 1/2 * 1/3) ** (1/4)
    scores = text_metrics(["the cat sat on the mat"], [["the cat sat on a mat"]])
    assert scores["bleu"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 1 / 2 * 1 / 3) ** 0.25, abs=1e-9)
    # shorter hypothesis: brevity penalty exp(1 - 6/4); precisions 4/4, 3/3, 2/2, 1/1
    short = text_metrics(["the cat sat on"], [["the cat sat on a mat"]])
    assert short["bleu"] == pytest.approx(100 * math.exp(1 - 6 / 4), abs=1e-9)


def test_chrf_by_hand():
    # character n-grams of "abc" against "abd": 1-grams 2/3 match, 2-grams 1/2, 3-grams 0/1, no longer ones.
    # chrF averages precision and recall over the 3 orders that exist (both 7/18), F-beta of equal P and R is P.
    assert text_metrics(["abc"], [["abd"]])["chrf"] == pytest.approx(100 * 7 / 18, abs=1e-9)


def test_rouge_by_hand():
    # prediction "the cat was found under the bed", reference "the cat was under the bed"
    # ROUGE-1: 6 shared unigrams: P 6/7, R 6/6; ROUGE-2: 4 shared bigrams of 6 and 5; ROUGE-L: LCS 6 of 7 and 6
    scores = text_metrics(["the cat was found under the bed"], [["the cat was under the bed"]])
    f1 = lambda p, r: 2 * p * r / (p + r)  # noqa: E731
    assert scores["rouge1"] == pytest.approx(100 * f1(6 / 7, 1.0))
    assert scores["rouge2"] == pytest.approx(100 * f1(4 / 6, 4 / 5))
    assert scores["rougeL"] == pytest.approx(100 * f1(6 / 7, 1.0))


def test_exact_match_and_token_f1_by_hand():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert exact_match("The Cat!", ["cat"]) == 1.0
    assert exact_match("a dog", ["cat", "the dog"]) == 1.0
    assert exact_match("dog", ["cat"]) == 0.0
    # "the big cat sat" -> [big, cat, sat]; "a cat sat down" -> [cat, sat, down]: 2 shared, P = R = 2/3
    assert token_f1("the big cat sat", ["a cat sat down"]) == pytest.approx(2 / 3)
    # the best reference counts: [cat] against [cat] is 1
    assert token_f1("cat", ["a dog", "the cat"]) == 1.0
    assert token_f1("", ["cat"]) == 0.0
    scores = text_metrics(["The Cat!", "the big cat sat"], [["cat"], ["a cat sat down"]])
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["token_f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    with pytest.raises(LMForgeError):
        text_metrics(["a"], [])


def test_several_references():
    scores = text_metrics(["the cat sat on the mat"], [["a dog ran", "the cat sat on the mat"]])
    assert scores["bleu"] == pytest.approx(100.0)
    assert scores["exact_match"] == scores["rouge1"] == pytest.approx(100.0)


def test_classification_metrics_by_hand():
    # true  0 0 1 1 1, predicted 0 1 1 1 0
    probabilities = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8], [0.55, 0.45]])
    m = classification_metrics([0, 0, 1, 1, 1], probabilities, ["neg", "pos"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["per_class"]["neg"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["per_class"]["pos"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["pos"]["recall"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert m["confusion_matrix"] == [[1, 1], [1, 2]]
    # AUC: negatives score 0.1 and 0.6, positives 0.7, 0.8, 0.45; the positive is higher in 5 of the 6 pairs
    assert m["roc_auc"] == pytest.approx(5 / 6)
    curve = m["roc_curves"]["pos"]
    assert curve["fpr"][0] == 0 and curve["fpr"][-1] == 1 and curve["tpr"][-1] == 1


def test_multiclass_roc_auc_and_missing_label():
    labels = ["a", "b", "c"]
    eye = np.eye(3) * 0.8 + 0.2 / 3  # confident and right: AUC 1 for each one-vs-rest
    m = classification_metrics([0, 1, 2], eye, labels)
    assert m["roc_auc"] == pytest.approx(1.0) and set(m["roc_curves"]) == set(labels)
    partial = classification_metrics([0, 1], eye[:2], labels)  # label c never occurs: AUC is undefined
    assert partial["roc_auc"] is None and partial["per_class"]["c"]["support"] == 0
