"""train.metrics against scikit-learn and hand-computed values."""
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score, roc_auc_score

from train.metrics import (classification_metrics, normalize_answer, parse_predictions, rouge_l, squad_metrics,
                           token_f1, wilson_interval)


def _random_case(n_classes: int, n: int = 200, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes)) + 1.5 * np.eye(n_classes)[y]  # informative, not perfect
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, probs


@pytest.mark.parametrize("n_classes", [2, 3, 5], ids=lambda c: f"C{c}")
def test_matches_sklearn_from_probabilities(n_classes):
    y, probs = _random_case(n_classes)
    names = [f"c{i}" for i in range(n_classes)]
    m = classification_metrics(y, probs, names)
    pred = probs.argmax(1)
    assert m["n"] == len(y) and m["n_unparsed"] == 0
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["precision_macro"] == pytest.approx(precision_score(y, pred, average="macro", zero_division=0))
    assert m["recall_macro"] == pytest.approx(recall_score(y, pred, average="macro", zero_division=0))
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    per_f1 = f1_score(y, pred, average=None)
    per_recall = recall_score(y, pred, average=None)
    for i, name in enumerate(names):
        assert m["per_class"][name]["f1"] == pytest.approx(per_f1[i])
        assert m["per_class_accuracy"][name] == pytest.approx(per_recall[i])  # per-class accuracy = recall
    expected_auc = (roc_auc_score(y, probs[:, 1]) if n_classes == 2
                    else roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["roc_auc"] == pytest.approx(expected_auc)
    assert m["confusion_matrix"] == confusion_matrix(y, pred).tolist()


@pytest.mark.parametrize("k,n", [(0, 10), (1, 10), (5, 10), (10, 10), (892, 1000), (789, 872), (3, 2500)])
def test_wilson_interval_matches_scipy(k, n):
    from scipy.stats import binomtest

    expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(expected.low, abs=1e-9) and hi == pytest.approx(expected.high, abs=1e-9)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_wilson_interval_endpoints_solve_the_score_equation():
    # the definition: |p_hat - p0| = z * sqrt(p0 (1 - p0) / n) at both ends (away from 0 and 1)
    k, n, z = 37, 50, 1.959964
    for p0 in wilson_interval(k, n, z):
        assert abs(k / n - p0) == pytest.approx(z * np.sqrt(p0 * (1 - p0) / n), rel=1e-9)
    wide, narrow = wilson_interval(37, 50), wilson_interval(370, 500)
    assert wide[1] - wide[0] > narrow[1] - narrow[0]          # ten times the rows: a narrower interval


@pytest.mark.parametrize("k,n", [(1, 0), (-1, 5), (6, 5)])
def test_wilson_interval_rejects_impossible_counts(k, n):
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(k, n)


def test_metrics_carry_the_accuracy_and_em_intervals():
    y, probs = _random_case(3, n=300)
    m = classification_metrics(y, probs, ["a", "b", "c"])
    correct = int((probs.argmax(1) == y).sum())
    assert m["accuracy_ci95"] == list(wilson_interval(correct, 300))
    q = squad_metrics({"a": "x", "b": "y"}, [{"id": "a", "answers": ["x"]}, {"id": "b", "answers": ["z"]},
                                             {"id": "c", "answers": []}])
    assert q["exact"] == pytest.approx(200 / 3)
    assert q["exact_ci95"] == pytest.approx([100 * v for v in wilson_interval(2, 3)])


def test_hand_computed_binary():
    # true: 0 0 1 1 ; pred: 0 1 1 1 -> acc 3/4; class 0: P 1, R 1/2; class 1: P 2/3, R 1
    m = classification_metrics([0, 0, 1, 1], [0, 1, 1, 1], ["negative", "positive"])
    assert m["accuracy"] == 0.75
    assert m["per_class"]["negative"]["precision"] == 1.0 and m["per_class"]["negative"]["recall"] == 0.5
    assert m["per_class"]["positive"]["precision"] == pytest.approx(2 / 3)
    assert m["recall_macro"] == pytest.approx(0.75)
    assert m["confusion_matrix"] == [[1, 1], [0, 2]]
    assert m["roc_auc"] is None  # hard predictions carry no scores


def test_unparsed_predictions_count_as_wrong_never_dropped():
    names = ["negative", "neutral", "positive"]
    m = classification_metrics([0, 1, 2, 2], [0, -1, "positive", "maybe"], names)
    assert m["n"] == 4 and m["n_unparsed"] == 2
    assert m["accuracy"] == 0.5
    assert m["confusion_matrix_labels"]["columns"] == names + ["none"]
    assert m["confusion_matrix"] == [[1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 1]]
    assert m["per_class"]["neutral"]["recall"] == 0.0
    assert m["per_class"]["positive"]["precision"] == 1.0  # a "none" is a false positive of no class


def test_parse_predictions_accepts_names_ints_and_garbage():
    got = parse_predictions(["Positive ", 0, None, "???", 7, -1], ["negative", "positive"])
    assert got.tolist() == [1, 0, -1, -1, -1, -1]


def test_auc_is_none_when_a_class_is_absent():
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1]])
    assert classification_metrics([0, 1], probs, ["a", "b", "c"])["roc_auc"] is None


def test_rejects_bad_shapes_and_labels():
    with pytest.raises(ValueError, match="outside"):
        classification_metrics([0, 3], [0, 1], ["a", "b"])
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        classification_metrics([0, 1], np.ones((2, 3)) / 3, ["a", "b"])
    with pytest.raises(ValueError, match="non-empty"):
        classification_metrics([], [], ["a", "b"])


@pytest.mark.parametrize("raw, expected", [
    ("The Cat!", "cat"),
    ("  a  b\tc ", "b c"),
    ("An apple, the pear.", "apple pear"),
    ("theory of anarchy", "theory of anarchy"),  # articles only as whole words
    ("1,000 (approx.)", "1000 approx"),
    ("", ""),
], ids=["article+punct", "whitespace", "an/the", "whole-words", "digits", "empty"])
def test_squad_normalisation(raw, expected):
    assert normalize_answer(raw) == expected


def test_token_f1_and_rouge_hand_computed():
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(2 * (2 / 2) * (2 / 3) / (1 + 2 / 3))
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    # pred [cat, sat, on, mat], gold [cat, on, mat]: LCS 3 -> P 3/4, R 1
    assert rouge_l("the cat sat on the mat", "cat on the mat") == pytest.approx(2 * 0.75 / 1.75)


def test_squad_metrics_hand_computed():
    refs = [
        {"id": "a", "answers": ["Paris", "the city of Paris"]},  # exact
        {"id": "b", "answers": ["10th and 11th centuries"]},     # partial: pred "11th centuries"
        {"id": "c", "answers": []},                              # unanswerable, abstains -> correct
        {"id": "d", "answers": []},                              # unanswerable, answers -> wrong
        {"id": "e", "answers": ["Rollo"]},                       # missing prediction = abstain -> wrong
    ]
    preds = {"a": "paris.", "b": "11th centuries", "c": "", "d": "Normandy"}
    m = squad_metrics(preds, refs)
    f1_b = 2 * 1.0 * 0.5 / 1.5  # pred 2 tokens both in gold (4 tokens; "and" counts)
    assert m["n"] == 5 and m["n_has_ans"] == 3 and m["n_no_ans"] == 2
    assert m["exact"] == pytest.approx(100 * 2 / 5)
    assert m["f1"] == pytest.approx(100 * (1 + f1_b + 1 + 0 + 0) / 5)
    assert m["has_ans_exact"] == pytest.approx(100 / 3)
    assert m["has_ans_f1"] == pytest.approx(100 * (1 + f1_b) / 3)
    assert m["no_ans_exact"] == 50.0 and m["no_ans_f1"] == 50.0


def test_squad_metrics_accepts_mapping_and_hub_layout():
    m = squad_metrics({"q": "x"}, {"q": {"text": ["x"], "answer_start": [0]}})
    assert m["exact"] == 100.0 and m["no_ans_exact"] is None


# ----------------------------------------------------------------------------------------------------------
# train.report (it renders these metrics)

def test_report_writes_every_file(tmp_path):
    import json

    from train.report import write_report

    names = ["negative", "positive"]
    y, probs = _random_case(2, n=40)
    rows = {"fine_tuned": classification_metrics(y, probs, names),
            "zero_shot": classification_metrics(y, [0] * 20 + [-1] * 20, names),
            "few_shot_4": classification_metrics(y, probs[::-1], names)}
    preds = [{"text": f"t{i}", "label": names[v], "zero_shot_pred": "negative"} for i, v in enumerate(y)]
    write_report(tmp_path, rows=rows, predictions=preds, label_names=names,
                 config={"model": "smollm2-135m", "lr": 3e-4, "shape": np.int64(3)}, elapsed=12.345)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["zero_shot"]["accuracy"] == rows["zero_shot"]["accuracy"]
    assert metrics["fine_tuned"]["accuracy"] == rows["fine_tuned"]["accuracy"]
    assert metrics["elapsed_s"] == 12.35 and metrics["config"]["shape"] == 3
    md = (tmp_path / "results.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and "row" not in line][:3]
    assert [line.split("|")[1].strip() for line in table] == ["zero-shot", "few-shot-4", "fine-tuned"]
    assert "macro F1" in md and "AUC" in md
    lo, hi = rows["fine_tuned"]["accuracy_ci95"]
    assert f"| {rows['fine_tuned']['accuracy']:.4f} | [{lo:.4f}, {hi:.4f}] |" in md
    csv_lines = (tmp_path / "predictions.csv").read_text().splitlines()
    assert csv_lines[0] == "text,label,zero_shot_pred" and len(csv_lines) == 41
    for row in rows:
        assert (tmp_path / f"confusion_{row}.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_report_squad_rows(tmp_path):
    from train.report import write_report

    m = squad_metrics({"a": "x"}, [{"id": "a", "answers": ["x"]}, {"id": "b", "answers": []}])
    write_report(tmp_path, rows={"zero_shot": m, "fine_tuned": m}, config=None, elapsed=1.0)
    md = (tmp_path / "results.md").read_text()
    assert "| EM | EM 95% CI | F1 |" in md and "100.00" in md
    assert f"| 100.00 | [{100 * wilson_interval(2, 2)[0]:.2f}, 100.00] |" in md   # both right: EM 100
    assert not list(tmp_path.glob("*.png"))
