"""Offline task data for the mission's applications: sentiment, topic classification, translation.

Nothing can be downloaded here, so the project makes its own labelled data, deterministically from a seed, in one
row shape that serves both fine-tuning and evaluation:

    {"prompt": "Review: the soup was cold and bland.\\nSentiment:", "completion": " negative",
     "label": 0, "choices": ["negative", "positive"]}

Fine-tuning reads ``prompt``/``completion`` (``data.format=prompt_completion``); the lm-evaluation-harness tasks
under ``configs/lm_eval/`` read ``prompt``, ``choices`` and ``label`` (multiple choice, accuracy) or ``prompt`` and
``completion`` (generation, BLEU / chrF). A completion is the label's choice after one space, the harness's own
``target_delimiter``, so a fine-tuned model is scored on exactly the text it was trained to write. Train and test
rows come from disjoint seeds and the test rows are checked not to repeat a training prompt, so a score measures
generalisation, not recall.

- ``sentiment``: short product and restaurant reviews whose polarity is carried by their opinion words (with
  neutral filler sentences between them);
- ``topic``: one or two sentences about sports, cooking, computers or weather -> the topic's name;
- ``translate``: a digit string -> its digits as English words (``4 0 7`` -> ``four zero seven``).
"""

from __future__ import annotations

import json
import os
import random

TASK_NAMES = ("sentiment", "topic", "translate")

_NOUNS = ["soup", "service", "pasta", "coffee", "room", "staff", "phone", "battery", "screen", "movie", "book",
          "chair", "jacket", "camera", "hotel", "pizza", "game", "keyboard", "bread", "salad"]
_POSITIVE = ["great", "excellent", "wonderful", "delicious", "friendly", "superb", "lovely", "fantastic",
             "perfect", "amazing", "pleasant", "brilliant"]
_NEGATIVE = ["terrible", "awful", "bland", "rude", "broken", "horrible", "disappointing", "poor", "cold",
             "dirty", "useless", "boring"]
_FILLER = ["we came on a tuesday.", "i bought it last week.", "my friend recommended it.", "it arrived on time.",
           "the price was average.", "we sat near the window.", "i used it every day.", "it was my first visit."]
_TOPICS = {  # topic -> (subjects, predicates): sentences are any subject with any predicate of the topic
    "sports": (["the team", "the coach", "the striker", "the keeper", "the runner", "the referee", "our club",
                "the captain"],
               ["scored a late goal", "won the match", "missed a penalty", "trained before the final",
                "broke the record", "lost in extra time", "signed a new contract", "cheered the fans"]),
    "cooking": (["the chef", "my grandmother", "the baker", "the recipe", "the cook", "our kitchen", "the sauce",
                 "the dough"],
                ["needs more salt", "was baked for an hour", "simmered all night", "used fresh basil",
                 "was stirred slowly", "burned the onions", "rose in the oven", "tasted of garlic"]),
    "computers": (["the compiler", "the server", "the program", "the laptop", "the kernel", "the database",
                   "the network card", "the driver"],
                  ["crashed at boot", "ran out of memory", "found a bug", "needs an update", "lost the connection",
                   "compiled the code", "filled the disk", "rebooted twice"]),
    "weather": (["the wind", "the rain", "the storm", "the fog", "the snow", "the forecast", "the sky",
                 "the thunder"],
                ["turned cold tonight", "came in from the sea", "covered the hills", "cleared by noon",
                 "lasted all week", "warned of frost", "brought heavy clouds", "kept the roads wet"]),
}
_DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _sentiment(rng: random.Random) -> dict:
    label = rng.randrange(2)
    words = _POSITIVE if label else _NEGATIVE
    parts = []
    for _ in range(rng.randint(1, 3)):
        parts.append(f"the {rng.choice(_NOUNS)} was {rng.choice(words)}.")
        if rng.random() < 0.5:
            parts.append(rng.choice(_FILLER))
    rng.shuffle(parts)
    choices = ["negative", "positive"]
    return {"prompt": f"Review: {' '.join(parts)}\nSentiment:", "completion": " " + choices[label], "label": label,
            "choices": choices}


def _topic(rng: random.Random) -> dict:
    names = sorted(_TOPICS)
    label = rng.randrange(len(names))
    subjects, predicates = _TOPICS[names[label]]
    sentences = [f"{rng.choice(subjects)} {rng.choice(predicates)}" for _ in range(rng.randint(1, 2))]
    return {"prompt": f"Text: {'. '.join(sentences)}.\nTopic:", "completion": " " + names[label], "label": label,
            "choices": names}


def _translate(rng: random.Random) -> dict:
    digits = [rng.randrange(10) for _ in range(rng.randint(2, 6))]
    source = " ".join(str(d) for d in digits)
    return {"prompt": f"Digits: {source}\nWords:", "completion": " " + " ".join(_DIGITS[d] for d in digits)}


_MAKERS = {"sentiment": _sentiment, "topic": _topic, "translate": _translate}


def make_task_rows(task: str, count: int, seed: int, exclude: set[str] | None = None) -> list[dict]:
    """``count`` rows of ``task``, deterministic in ``seed``; prompts in ``exclude`` are skipped (held-out rows
    never repeat a training prompt)."""
    if task not in _MAKERS:
        from framework.cli import UserError

        raise UserError(f"unknown task '{task}': use one of {', '.join(TASK_NAMES)}")
    rng, rows, seen = random.Random(f"{task}-{seed}"), [], set(exclude or ())
    tries = 0
    while len(rows) < count:
        row = _MAKERS[task](rng)
        tries += 1
        if row["prompt"] in seen:
            if tries > 50 * count:
                raise ValueError(f"task '{task}' cannot make {count} distinct rows")
            continue
        seen.add(row["prompt"])
        rows.append(row)
    return rows


def write_jsonl(rows: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)


def write_task_splits(out_dir: str, train: int = 2000, test: int = 200, seed: int = 0) -> list[str]:
    """``<task>_train.jsonl`` and ``<task>_test.jsonl`` for every task (test prompts disjoint from train)."""
    paths = []
    for task in TASK_NAMES:
        train_rows = make_task_rows(task, train, seed)
        test_rows = make_task_rows(task, test, seed + 1, exclude={r["prompt"] for r in train_rows})
        for split, rows in (("train", train_rows), ("test", test_rows)):
            path = os.path.join(out_dir, f"{task}_{split}.jsonl")
            write_jsonl(rows, path)
            paths.append(path)
    return paths
