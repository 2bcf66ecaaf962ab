"""Tests of capdec.metrics against real Java and real pycocoevalcap scorers."""

from __future__ import annotations

import json
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


def _record_java_starts(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Record the command of every subprocess.run call of capdec.metrics, then run it."""
    java_starts = []
    real_run = subprocess.run

    def counting_run(command, *args, **kwargs):  # type: ignore[no-untyped-def]
        java_starts.append(command)
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(metrics.subprocess, "run", counting_run)
    return java_starts


def test_scorer_tokenizes_references_once(monkeypatch: pytest.MonkeyPatch) -> None:
    java_starts = _record_java_starts(monkeypatch)
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


def test_tokenized_references_match_ptb_tokenize(scorer: CaptionScorer) -> None:
    tokenized = scorer.tokenized_references

    assert tokenized == ptb_tokenize(REFERENCES)
    assert tokenized["dog"][0] == "a dog runs on the grass"


def test_tokenized_references_is_a_copy(scorer: CaptionScorer) -> None:
    scorer.tokenized_references["dog"].append("changed")

    assert "changed" not in scorer.tokenized_references["dog"]


def test_reference_cache_roundtrip_scores_equal(scorer: CaptionScorer, tmp_path: Path) -> None:
    path = scorer.save(tmp_path / "references.json")
    predictions = {"dog": "A dog running on grass.", "cat": "A cat on a sofa.", "bus": "A red car"}

    cached = CaptionScorer.from_file(path, REFERENCES)

    assert cached.tokenized_references == scorer.tokenized_references
    assert cached.score(predictions) == scorer.score(predictions)


def test_reference_cache_skips_reference_tokenizer(
    scorer: CaptionScorer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = scorer.save(tmp_path / "references.json")
    java_starts = _record_java_starts(monkeypatch)
    cached = CaptionScorer.from_file(path, REFERENCES)
    cached.score({key: refs[0] for key, refs in REFERENCES.items()})

    # the only Java start tokenises the predictions
    assert len(java_starts) == 1


def test_reference_cache_serves_subset(scorer: CaptionScorer, tmp_path: Path) -> None:
    path = scorer.save(tmp_path / "references.json")
    subset = {"bus": REFERENCES["bus"], "dog": REFERENCES["dog"]}

    cached = CaptionScorer.from_file(path, subset)

    assert cached.num_images == 2
    assert list(cached.tokenized_references) == ["bus", "dog"]
    assert cached.tokenized_references["bus"] == scorer.tokenized_references["bus"]


def test_reference_cache_keeps_int_and_str_keys(tmp_path: Path) -> None:
    references = {7: ["A dog runs."], "7": ["A cat sleeps."]}
    path = CaptionScorer(references).save(tmp_path / "references.json")

    cached = CaptionScorer.from_file(path, references)

    assert cached.tokenized_references == {7: ["a dog runs"], "7": ["a cat sleeps"]}


def test_reference_cache_rejects_changed_captions(scorer: CaptionScorer, tmp_path: Path) -> None:
    path = scorer.save(tmp_path / "references.json")
    changed = {**REFERENCES, "cat": ["A dog on a sofa."]}

    with pytest.raises(ValueError, match=r"other reference captions for 1 images, e.g. \['cat'\]"):
        CaptionScorer.from_file(path, changed)


def test_reference_cache_rejects_missing_image(scorer: CaptionScorer, tmp_path: Path) -> None:
    path = scorer.save(tmp_path / "references.json")
    extended = {**REFERENCES, "boat": ["A boat on a lake."]}

    with pytest.raises(ValueError, match=r"lacks 1 of the 4 requested images, e.g. \['boat'\]"):
        CaptionScorer.from_file(path, extended)


def test_reference_cache_rejects_other_tokenizer(scorer: CaptionScorer, tmp_path: Path) -> None:
    path = scorer.save(tmp_path / "references.json")
    content = json.loads(path.read_text(encoding="utf-8"))
    content["tokenizer"] = ["stanford-corenlp-9.9.9.jar"]
    path.write_text(json.dumps(content), encoding="utf-8")

    with pytest.raises(ValueError, match="has tokenizer .*9.9.9.*delete it and write it again"):
        CaptionScorer.from_file(path, REFERENCES)


def test_reference_cache_rejects_malformed_file(tmp_path: Path) -> None:
    path = tmp_path / "references.json"
    path.write_text('{"images": [}', encoding="utf-8")

    with pytest.raises(ValueError, match="is not a reference cache written by CaptionScorer.save"):
        CaptionScorer.from_file(path, REFERENCES)


def test_reference_cache_rejects_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist; write it with"):
        CaptionScorer.from_file(tmp_path / "absent.json", REFERENCES)


def test_reference_cache_rejects_tuple_keys(tmp_path: Path) -> None:
    scorer = CaptionScorer({("coco", 1): ["A dog runs."]})

    with pytest.raises(TypeError, match=r"keys must be int or str; got tuple \('coco', 1\)"):
        scorer.save(tmp_path / "references.json")
    assert list(tmp_path.iterdir()) == []
