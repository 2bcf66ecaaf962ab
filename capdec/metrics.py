"""Captioning metrics (BLEU-1..4, ROUGE-L, CIDEr, METEOR) computed with pycocoevalcap 1.2.

The scores are pycocoevalcap's own scorers on captions tokenised the COCO way: the Stanford
PTBTokenizer jar shipped inside pycocoevalcap, with its flags and punctuation list. This module
replaces only pycocoevalcap's tokenizer wrapper, because that wrapper writes its temp file into the
package's install folder (so it fails where site-packages is read-only).

``CaptionScorer`` tokenises the references once, so per-epoch validation costs one Java start for
the predictions plus the scoring itself. ``CaptionScorer.save`` writes the tokenised references to
a JSON reference cache and ``CaptionScorer.from_file`` reads them back, so a study can tokenise
its validation references once and share them with every trial.

METEOR starts its own Java process and takes several seconds (6-12 s measured for 138 images on
a busy 2-core CPU), so it is off unless asked for.
SPICE and ``COCOEvalCap.evaluate`` are never used, because SPICE downloads Stanford CoreNLP on
first use.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as _meteor_module
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer as _ptb_module

from capdec.metric_names import FINAL_SCORE_KEYS, SCORE_KEYS

logger = logging.getLogger(__name__)

Key = TypeVar("Key", bound=Hashable)

PTB_JAR = Path(_ptb_module.__file__).resolve().parent / _ptb_module.STANFORD_CORENLP_3_4_1_JAR
METEOR_JAR = Path(_meteor_module.__file__).resolve().parent / _meteor_module.METEOR_JAR
# same command-line flags as pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer
_PTB_COMMAND = ("edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase")
# characters that the PTBTokenizer lexer (CoreNLP 3.4.1) treats as line breaks
_LINE_BREAKS = re.compile("\r\n|[\n\r\u000b\u000c\u0085\u2028\u2029]")
REFERENCE_CACHE_VERSION = 1
_INSTALL_HINT = (
    "Install a Java runtime (tested with OpenJDK 17), e.g. "
    "`apt-get install default-jre-headless`, then put `java` on PATH or set JAVA_HOME to its "
    "installation folder."
)


class JavaNotFoundError(RuntimeError):
    """No Java runtime was found on PATH or under JAVA_HOME."""


def check_java(needed_for: str = "the captioning metrics") -> str:
    """Find the Java executable that the PTBTokenizer and METEOR jars run on.

    ``$JAVA_HOME/bin/java`` is used when JAVA_HOME is set and contains it, because a user sets
    JAVA_HOME to choose a runtime. Otherwise ``java`` is looked up on PATH.

    Args:
        needed_for: what the caller needs Java for, quoted in the error message.

    Returns:
        The absolute path of the java executable.

    Raises:
        JavaNotFoundError: neither JAVA_HOME nor PATH provides an executable ``java``.
    """
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
        logger.warning(
            "JAVA_HOME=%s has no executable bin/java, so java is looked up on PATH", java_home
        )

    found = shutil.which("java")
    if found is not None:
        return found

    home_note = f"JAVA_HOME={java_home!r} has no bin/java" if java_home else "JAVA_HOME is unset"
    raise JavaNotFoundError(
        f"No Java runtime found for {needed_for}: pycocoevalcap's captioning metrics run on Java "
        "(the Stanford PTBTokenizer for BLEU, ROUGE-L and CIDEr, and METEOR). "
        f"There is no `java` on PATH, and {home_note}. {_INSTALL_HINT}"
    )


def ptb_tokenize(
    captions: Mapping[Key, Sequence[str]], *, java: str | None = None
) -> dict[Key, list[str]]:
    """Tokenise captions as pycocoevalcap's PTBTokenizer does, in one Java process.

    Captions are lowercased and split by the Stanford PTBTokenizer jar shipped in pycocoevalcap,
    then the tokens in pycocoevalcap's punctuation list are dropped, so "A dog, running." becomes
    "a dog running". The input file lives in a fresh temp directory, never in the install folder.
    Line breaks inside a caption become spaces. An empty caption, or one made only of
    punctuation, becomes "" in its place.

    Args:
        captions: image key -> captions of that image. Lists may be empty.
        java: path of the java executable; found with ``check_java`` when None.

    Returns:
        Image key -> tokenised captions, in the input order, tokens joined by single spaces.

    Raises:
        TypeError: a caption is not a str.
        JavaNotFoundError: no Java runtime was found.
        RuntimeError: the tokenizer failed, or returned a line count different from the number
            of captions.
    """
    keys: list[Key] = []
    lines: list[str] = []
    for key, texts in captions.items():
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"captions must be str; got {type(text).__name__} for key {key!r}")
            keys.append(key)
            lines.append(_LINE_BREAKS.sub(" ", text))

    tokenized: dict[Key, list[str]] = {key: [] for key in captions}
    if not lines:
        return tokenized

    java = java or check_java("ptb_tokenize")
    for key, line in zip(keys, _run_ptb_tokenizer(java, lines), strict=True):
        words = line.rstrip().split(" ")
        tokens = [word for word in words if word not in _ptb_module.PUNCTUATIONS]
        tokenized[key].append(" ".join(tokens))
    return tokenized


def _run_ptb_tokenizer(java: str, lines: list[str]) -> list[str]:
    """Run the PTBTokenizer jar once on ``lines`` and return one output line per input line."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="capdec-ptb-") as tmp_dir:
        input_path = Path(tmp_dir) / "captions.txt"
        # without a trailing newline, the tokenizer writes exactly len(lines) - 1 newlines
        input_path.write_text("\n".join(lines), encoding="utf-8")
        command = [java, "-cp", str(PTB_JAR), *_PTB_COMMAND, str(input_path)]
        result = subprocess.run(command, capture_output=True, check=False)

    if result.returncode != 0:
        stderr = result.stderr.decode("utf-8", errors="replace").strip()
        raise RuntimeError(
            f"PTBTokenizer failed with exit code {result.returncode} "
            f"({' '.join(command[:3])} ...): {stderr[-2000:]}"
        )

    output = result.stdout.decode("utf-8").split("\n")
    if len(output) != len(lines):
        raise RuntimeError(
            f"PTBTokenizer returned {len(output)} lines for {len(lines)} captions, so tokens "
            "cannot be matched to their captions; look for control characters or unusual line "
            "separators in the captions"
        )
    logger.debug("tokenised %d captions in %.2f s", len(lines), time.perf_counter() - start)
    return output


class CaptionScorer(Generic[Key]):
    """Score predicted captions against a fixed set of references.

    The references are tokenised once, in the constructor, so build one scorer per split and
    reuse it every epoch: each ``score`` call then costs one Java start for the predictions.
    ``save`` and ``from_file`` carry the tokenised references across processes, so the trials of
    a study need not tokenise them again.

    CIDEr here is pycocoevalcap's CIDEr-D (n-grams 1-4, sigma 6). Its document frequencies are
    computed over the references of the images being scored, which is the COCO standard. So the
    CIDEr of a subset of images differs from its contribution to the score of the whole set,
    and CIDEr over a single image is 0 because every idf is log(1 / 1).
    """

    def __init__(self, references: Mapping[Key, Sequence[str]]) -> None:
        """Tokenise the references.

        Args:
            references: image key -> reference captions (at least one per image).

        Raises:
            ValueError: ``references`` is empty, or an image has no reference caption.
            TypeError: a reference caption is not a str.
            JavaNotFoundError: no Java runtime was found.
        """
        _check_references(references)
        self._java = check_java("CaptionScorer")
        self._raw_references = {key: list(texts) for key, texts in references.items()}
        self._references = ptb_tokenize(references, java=self._java)

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, references: Mapping[Key, Sequence[str]]
    ) -> CaptionScorer[Key]:
        """Build a scorer from a reference cache written by ``save``, without tokenising.

        The cache may hold more images than ``references``, so one cache of a whole split serves
        every fixed subset of it. Each requested image must be in the cache with exactly the
        same reference captions, which rejects a cache written for other data.

        Args:
            path: JSON file written by ``CaptionScorer.save``.
            references: image key -> reference captions of the images to score; keys are int
                or str, as in the cache.

        Returns:
            A scorer over exactly the keys of ``references``, in their order.

        Raises:
            FileNotFoundError: the cache file does not exist.
            ValueError: ``references`` is empty or has an image without captions. Also raised
                when the file is not a reference cache of this version and tokenizer, or when it
                lacks a requested image or contains other captions for one.
            JavaNotFoundError: no Java runtime was found (scoring predictions needs one).
        """
        _check_references(references)
        cached = _read_reference_cache(Path(path))
        missing = [key for key in references if key not in cached]
        if missing:
            raise ValueError(
                f"reference cache {path} lacks {len(missing)} of the {len(references)} requested "
                f"images, e.g. {missing[:5]!r}; it was written for other data, so delete it and "
                "write it again with CaptionScorer(references).save(path)"
            )
        changed = [key for key in references if cached[key][0] != list(references[key])]
        if changed:
            raise ValueError(
                f"reference cache {path} contains other reference captions for {len(changed)} "
                f"images, e.g. {changed[:5]!r}; it was written for other data, so delete it and "
                "write it again with CaptionScorer(references).save(path)"
            )

        scorer = cls.__new__(cls)
        scorer._java = check_java("CaptionScorer")
        scorer._raw_references = {key: list(cached[key][0]) for key in references}
        scorer._references = {key: list(cached[key][1]) for key in references}
        logger.debug("read %d tokenised references from %s", len(references), path)
        return scorer

    @property
    def num_images(self) -> int:
        """Number of images with references."""
        return len(self._references)

    @property
    def tokenized_references(self) -> dict[Key, list[str]]:
        """Copy of the PTB-tokenised references: image key -> captions, tokens joined by spaces."""
        return {key: list(texts) for key, texts in self._references.items()}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the references, raw and tokenised, to a JSON reference cache.

        The file is written under a temporary name and renamed, so a reader never sees a partly
        written cache. It records the cache format version, the PTBTokenizer jar and flags, and
        pycocoevalcap's punctuation list, and ``from_file`` rejects a cache whose values differ.

        Args:
            path: destination file; its folder must exist.

        Returns:
            The path written.

        Raises:
            TypeError: an image key is neither int nor str, which JSON cannot hold unchanged.
        """
        path = Path(path)
        images = []
        for key, tokenized in self._references.items():
            if isinstance(key, bool) or not isinstance(key, (int, str)):
                raise TypeError(
                    f"reference cache keys must be int or str; got {type(key).__name__} {key!r}"
                )
            images.append(
                {"key": key, "references": self._raw_references[key], "tokenized": tokenized}
            )
        content = {**_reference_cache_identity(), "images": images}

        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                json.dump(content, stream, ensure_ascii=False)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        logger.info("wrote %d tokenised references to %s", len(images), path)
        return path

    def score(self, predictions: Mapping[Key, str], *, meteor: bool = False) -> dict[str, float]:
        """Score one predicted caption per image.

        Args:
            predictions: image key -> predicted caption; the keys must equal the references'.
            meteor: also compute METEOR, which starts a Java process and takes several seconds.
                Keep it for final evaluation.

        Returns:
            Scores keyed as ``SCORE_KEYS`` (``FINAL_SCORE_KEYS`` when meteor is True), in that
            order. Each is in [0, 1] except CIDEr, which is in [0, 10].

        Raises:
            ValueError: the prediction keys differ from the reference keys.
            TypeError: a prediction is not a str.
            RuntimeError: the tokenizer or METEOR failed.
        """
        predicted = self._tokenize_predictions(predictions)
        start = time.perf_counter()

        bleu, _ = Bleu(4).compute_score(self._references, predicted, verbose=0)
        rouge_l, _ = Rouge().compute_score(self._references, predicted)
        cider, _ = Cider().compute_score(self._references, predicted)
        scores = {f"bleu_{n + 1}": float(value) for n, value in enumerate(bleu)}
        scores["rouge_l"] = float(rouge_l)
        scores["cider"] = float(cider)
        if meteor:
            scores["meteor"] = _meteor_score(self._java, self._references, predicted)

        logger.debug("scored %d images in %.2f s", len(predicted), time.perf_counter() - start)
        return {key: scores[key] for key in (FINAL_SCORE_KEYS if meteor else SCORE_KEYS)}

    def score_per_image_cider(self, predictions: Mapping[Key, str]) -> dict[Key, float]:
        """Compute each image's CIDEr-D, with document frequencies over all scored images.

        Args:
            predictions: image key -> predicted caption; the keys must equal the references'.

        Returns:
            Image key -> CIDEr-D in [0, 10]; their mean is ``score(predictions)["cider"]``.

        Raises:
            ValueError: the prediction keys differ from the reference keys.
            TypeError: a prediction is not a str.
        """
        predicted = self._tokenize_predictions(predictions)
        _, per_image = Cider().compute_score(self._references, predicted)
        return {key: float(value) for key, value in zip(self._references, per_image, strict=True)}

    def _tokenize_predictions(self, predictions: Mapping[Key, str]) -> dict[Key, list[str]]:
        missing = [key for key in self._references if key not in predictions]
        extra = [key for key in predictions if key not in self._references]
        if missing or extra:
            raise ValueError(
                f"prediction keys must equal the {self.num_images} reference keys; "
                f"missing {len(missing)} {missing[:5]!r}, extra {len(extra)} {extra[:5]!r}"
            )

        for key in self._references:
            if not isinstance(predictions[key], str):
                kind = type(predictions[key]).__name__
                raise TypeError(f"predictions must be str, one per image; got {kind} for {key!r}")
        return ptb_tokenize({key: [predictions[key]] for key in self._references}, java=self._java)


def _check_references(references: Mapping[Key, Sequence[str]]) -> None:
    if not references:
        raise ValueError("references must contain at least one image; got an empty mapping")
    empty = [key for key, texts in references.items() if len(texts) == 0]
    if empty:
        raise ValueError(
            f"every image needs at least one reference caption; {len(empty)} have none, "
            f"e.g. {empty[:5]!r}"
        )


def _reference_cache_identity() -> dict[str, Any]:
    """Return what decides the tokenised text: cache version, tokenizer command, punctuation."""
    return {
        "format_version": REFERENCE_CACHE_VERSION,
        "tokenizer": [PTB_JAR.name, *_PTB_COMMAND],
        "punctuations": list(_ptb_module.PUNCTUATIONS),
    }


def _read_reference_cache(path: Path) -> dict[Any, tuple[list[str], list[str]]]:
    """Read a cache written by ``CaptionScorer.save``: key -> (raw, tokenised captions)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"reference cache {path} does not exist; write it with "
            "CaptionScorer(references).save(path)"
        )
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        identity = {name: content[name] for name in _reference_cache_identity()}
        images = {}
        for entry in content["images"]:
            raw, tokenized = entry["references"], entry["tokenized"]
            if not isinstance(raw, list) or not isinstance(tokenized, list):
                raise TypeError(f"captions of image {entry['key']!r} are not lists")
            if len(raw) != len(tokenized):
                raise ValueError(f"image {entry['key']!r} has {len(raw)} captions but "
                                 f"{len(tokenized)} tokenised ones")
            images[entry["key"]] = (raw, tokenized)
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{path} is not a reference cache written by CaptionScorer.save ({error!r}); "
            "delete it and write it again"
        ) from error

    expected = _reference_cache_identity()
    for name, value in identity.items():
        if value != expected[name]:
            raise ValueError(
                f"reference cache {path} has {name} {value!r}, but this version uses "
                f"{expected[name]!r}; delete it and write it again"
            )
    return images


class _Meteor(_meteor_module.Meteor):
    """pycocoevalcap's Meteor, started with a given java executable and closed explicitly."""

    def __init__(self, java: str) -> None:
        # the same command as Meteor.__init__, except the java path
        self.meteor_cmd = [
            java,
            "-jar",
            "-Xmx2G",
            str(METEOR_JAR),
            "-",
            "-",
            "-stdio",
            "-l",
            "en",
            "-norm",
        ]
        self.meteor_p = subprocess.Popen(
            self.meteor_cmd,
            cwd=METEOR_JAR.parent,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.lock = threading.Lock()
        self._stderr_tail: str | None = None

    def close(self) -> str:
        """Stop the Java process (once) and return the tail of what it wrote to stderr."""
        if self._stderr_tail is not None:
            return self._stderr_tail

        process = self.meteor_p
        if process.poll() is None:
            process.kill()
        process.wait()

        stdin, stderr = process.stdin, process.stderr
        assert stdin is not None and stderr is not None, "METEOR was started without pipes"
        # closing raises BrokenPipeError when the process died with input still buffered
        with contextlib.suppress(OSError):
            stdin.close()
        self._stderr_tail = stderr.read().decode("utf-8", errors="replace").strip()[-2000:]
        stderr.close()
        if process.stdout is not None:
            process.stdout.close()
        return self._stderr_tail

    def __del__(self) -> None:
        # replaces Meteor.__del__, which takes a lock that a failed compute_score call leaves held
        if getattr(self, "_stderr_tail", "") is None:
            self.close()


def _meteor_score(
    java: str, references: dict[Key, list[str]], predictions: dict[Key, list[str]]
) -> float:
    start = time.perf_counter()
    scorer = _Meteor(java)
    try:
        value, _ = scorer.compute_score(references, predictions)
    except (ValueError, OSError) as error:
        # a dead METEOR process shows up as an empty output line (ValueError) or a broken pipe
        raise RuntimeError(f"METEOR failed ({error}); its stderr: {scorer.close()}") from error
    finally:
        scorer.close()
    logger.debug("METEOR on %d images took %.1f s", len(predictions), time.perf_counter() - start)
    return float(value)
