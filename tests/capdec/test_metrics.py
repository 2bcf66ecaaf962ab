"""Tests of capdec.metrics against real Java and real pycocoevalcap scorers."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from capdec import metrics
from capdec.metric_names import FINAL_SCORE_KEYS, SCORE_KEYS
from capdec.metrics import CaptionScorer, JavaNotFoundError, check_java, ptb_tokenize

pytestmark = pytest.mark.skipif(
    shutil.which("java") is None and not os.environ.get("JAVA_HOME"),
    reason="needs a Java runtime for the PTBTokenizer (apt-get install default-jre-headless)",
)

REFERENCES = {
    "dog": ["A dog runs on the grass.", "A brown dog running in a field.", "The dog is running."],
    "cat": ["A cat sleeps on a red sofa.", "A cat is sleeping on the couch.", "A sleeping cat."],
    "bus": ["A red bus on a city street.", "A bus drives down the street.", "A big red bus."],
}


def _ngrams(sentence: str, n: int) -> Counter[tuple[str, ...]]:
    words = sentence.split()
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def _tfidf(
    sentence: str, n: int, df: Counter[tuple[str, ...]], num_images: int
) -> dict[tuple[str, ...], float]:
    return {g: c * math.log(num_images / max(1.0, df[g])) for g, c in _ngrams(sentence, n).items()}


def _norm(vector: dict[tuple[str, ...], float]) -> float:
    return math.sqrt(sum(value * value for value in vector.values()))


def _cider_d(
    references: dict[str, list[str]], candidates: dict[str, str], sigma: float = 6.0
) -> float:
    """Compute CIDEr-D from its definition, independently of pycocoevalcap.

    CIDEr-D (Vedantam et al., 2015, "CIDEr: Consensus-based Image Description Evaluation"): per
    n = 1..4, the tf-idf cosine of candidate and reference with the candidate's weights clipped
    at the reference's, times a Gaussian length penalty; averaged over references, n and images,
    times 10. Inputs are tokenised already. Every sentence needs at least two words, because
    pycocoevalcap measures length in bigrams and this function in words.
    """
    num_images = len(references)
    total = 0.0
    for n in range(1, 5):
        # document frequency: the number of images with the n-gram in any of their references
        df: Counter[tuple[str, ...]] = Counter()
        for refs in references.values():
            df.update({gram for ref in refs for gram in _ngrams(ref, n)})

        for key, candidate in candidates.items():
            cand = _tfidf(candidate, n, df, num_images)
            for ref_text in references[key]:
                ref = _tfidf(ref_text, n, df, num_images)
                dot = sum(min(v, ref.get(g, 0.0)) * ref.get(g, 0.0) for g, v in cand.items())
                cosine = dot / (_norm(cand) * _norm(ref)) if _norm(cand) * _norm(ref) else 0.0
                gap = len(candidate.split()) - len(ref_text.split())
                penalty = math.exp(-(gap**2) / (2 * sigma**2))
                total += cosine * penalty / len(references[key])
    return 10.0 * total / (4 * len(candidates))


def _install_dir_files() -> set[Path]:
    # pycocoevalcap has no __init__.py, so its folder is found through the jar
    install_dir = metrics.PTB_JAR.parents[1]
    return {path for path in install_dir.rglob("*") if "__pycache__" not in path.parts}


@pytest.fixture(scope="module")
def scorer() -> CaptionScorer:
    return CaptionScorer(REFERENCES)


def test_tokenize_lowercases_and_strips_punctuation() -> None:
    tokenized = ptb_tokenize({1: ["A dog, running."]})

    assert tokenized == {1: ["a dog running"]}


def test_tokenize_keeps_empty_captions_aligned() -> None:
    captions = {"a": ["", "One.", "..."], "b": [], "c": ["Two\nlines\r\nhere", ""]}

    tokenized = ptb_tokenize(captions)

    assert tokenized["a"] == ["", "one", ""]
    assert tokenized["b"] == []
    assert tokenized["c"] == ["two lines here", ""]


def test_tokenize_matches_pycocoevalcap_tokenizer_output() -> None:
    # pycocoevalcap 1.2 keeps these tokens. Because -lowerCase turns -LRB- into -lrb-, its
    # punctuation list misses the brackets.
    tokenized = ptb_tokenize({0: ["Don't stop (now) -- U.S.A. at 3.5 km/h; ok?!"]})

    assert tokenized[0] == ["do n't stop -lrb- now -rrb- u.s.a. at 3.5 km/h ok ?!"]


def test_tokenize_rejects_non_string_caption() -> None:
    with pytest.raises(TypeError, match="got int for key 'x'"):
        ptb_tokenize({"x": [3]})  # type: ignore[list-item]


def test_tokenize_raises_on_line_count_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    # with no line breaks replaced, the tokenizer splits "a\rb" into two lines
    monkeypatch.setattr(metrics, "_LINE_BREAKS", re.compile("(?!)"))

    with pytest.raises(RuntimeError, match="returned 2 lines for 1 captions"):
        ptb_tokenize({0: ["a\rb"]})


def _failing_java(tmp_path: Path) -> str:
    script = tmp_path / "java"
    script.write_text("#!/bin/sh\necho 'Error: no JVM here' >&2\nexit 1\n")
    script.chmod(0o755)
    return str(script)


def test_tokenize_reports_java_failure(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="exit code 1 .*no JVM here"):
        ptb_tokenize({0: ["a dog"]}, java=_failing_java(tmp_path))


def test_meteor_reports_java_failure(tmp_path: Path) -> None:
    tokenized = {0: ["a dog"]}

    with pytest.raises(RuntimeError, match="METEOR failed .*no JVM here"):
        metrics._meteor_score(_failing_java(tmp_path), tokenized, tokenized)


def test_identical_prediction_scores_one() -> None:
    # each prediction equals every reference of its image
    references = {key: [refs[0]] * 3 for key, refs in REFERENCES.items()}
    predictions = {key: refs[0] for key, refs in REFERENCES.items()}

    scores = CaptionScorer(references).score(predictions)

    for n in range(1, 5):
        assert scores[f"bleu_{n}"] == pytest.approx(1.0, abs=1e-9)
    assert scores["rouge_l"] == pytest.approx(1.0, abs=1e-12)


def test_all_wrong_prediction_scores_zero(scorer: CaptionScorer) -> None:
    predictions = {key: "zebra umbrella quantum volcano" for key in REFERENCES}

    scores = scorer.score(predictions)

    assert scores["bleu_4"] == pytest.approx(0.0, abs=1e-9)
    assert scores["cider"] == 0.0
    assert scores["rouge_l"] == 0.0


def test_cider_matches_formula_on_three_images(scorer: CaptionScorer) -> None:
    predictions = {"dog": "A dog running on grass.", "cat": "A cat on a sofa.", "bus": "A red car"}
    tokenized_refs = {
        key: [ref.lower().replace(".", "") for ref in refs] for key, refs in REFERENCES.items()
    }
    tokenized_preds = {key: text.lower().replace(".", "") for key, text in predictions.items()}

    scores = scorer.score(predictions)

    assert scores["cider"] == pytest.approx(_cider_d(tokenized_refs, tokenized_preds), abs=1e-9)
    assert scores["cider"] > 0.0


def test_cider_of_single_image_is_zero() -> None:
    # document frequencies over one image make every idf log(1 / 1) = 0
    references = {"dog": REFERENCES["dog"]}

    scores = CaptionScorer(references).score({"dog": REFERENCES["dog"][0]})

    assert scores["cider"] == 0.0
    assert scores["bleu_1"] == pytest.approx(1.0, abs=1e-9)


def test_per_image_cider_averages_to_cider(scorer: CaptionScorer) -> None:
    predictions = {"dog": "A dog running on grass.", "cat": "A cat on a sofa.", "bus": "A red car"}

    per_image = scorer.score_per_image_cider(predictions)

    assert list(per_image) == list(REFERENCES)
    mean = sum(per_image.values()) / len(per_image)
    assert mean == pytest.approx(scorer.score(predictions)["cider"], abs=1e-12)
    assert per_image["dog"] > per_image["bus"]


def test_score_keys_match_metric_names(scorer: CaptionScorer) -> None:
    predictions = {key: refs[1] for key, refs in REFERENCES.items()}

    scores = scorer.score(predictions)

    assert tuple(scores) == SCORE_KEYS
    assert all(isinstance(value, float) for value in scores.values())


def test_scorer_tokenizes_references_once(monkeypatch: pytest.MonkeyPatch) -> None:
    java_starts = []
    real_run = subprocess.run

    def counting_run(command, *args, **kwargs):  # type: ignore[no-untyped-def]
        java_starts.append(command)
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(metrics.subprocess, "run", counting_run)
    scorer = CaptionScorer(REFERENCES)
    predictions = {key: refs[0] for key, refs in REFERENCES.items()}
    scorer.score(predictions)
    scorer.score(predictions)

    # one start for the references, one per score() call
    assert len(java_starts) == 3
    assert all(str(metrics.PTB_JAR) in command for command in java_starts)


def test_scoring_writes_nothing_into_pycocoevalcap(scorer: CaptionScorer) -> None:
    before = _install_dir_files()
    scorer.score({key: refs[0] for key, refs in REFERENCES.items()})

    assert _install_dir_files() == before


def test_mismatched_keys_raise(scorer: CaptionScorer) -> None:
    with pytest.raises(ValueError, match=r"missing 1 \['bus'\], extra 1 \['boat'\]"):
        scorer.score({"dog": "a dog", "cat": "a cat", "boat": "a boat"})


def test_non_string_prediction_raises(scorer: CaptionScorer) -> None:
    with pytest.raises(TypeError, match="got list for 'dog'"):
        scorer.score({"dog": ["a dog"], "cat": "a cat", "bus": "a bus"})  # type: ignore[dict-item]


def test_scorer_rejects_image_without_references() -> None:
    with pytest.raises(ValueError, match="1 have none, e.g. \\['bus'\\]"):
        CaptionScorer({"dog": ["a dog"], "bus": []})


def test_scorer_rejects_empty_references() -> None:
    with pytest.raises(ValueError, match="at least one image"):
        CaptionScorer({})


def test_check_java_raises_without_java(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("JAVA_HOME", raising=False)

    with pytest.raises(JavaNotFoundError, match="Java runtime found for CaptionScorer") as error:
        CaptionScorer(REFERENCES)

    message = str(error.value)
    assert "METEOR" in message
    assert "apt-get install default-jre-headless" in message
    assert "JAVA_HOME is unset" in message


def test_check_java_uses_java_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    java = Path(check_java()).resolve()
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("JAVA_HOME", str(java.parent.parent))

    assert check_java() == str(java.parent.parent / "bin" / "java")


def test_check_java_names_invalid_java_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jdk"))

    with pytest.raises(JavaNotFoundError, match="no-jdk'? has no bin/java"):
        check_java()


@pytest.mark.slow
def test_meteor_of_identical_prediction_is_one() -> None:
    before = _install_dir_files()
    references = {key: [refs[0]] * 3 for key, refs in REFERENCES.items()}
    identical = {key: refs[0] for key, refs in REFERENCES.items()}

    scores = CaptionScorer(references).score(identical, meteor=True)

    assert tuple(scores) == FINAL_SCORE_KEYS
    assert scores["meteor"] == pytest.approx(1.0, abs=1e-6)
    assert _install_dir_files() == before
