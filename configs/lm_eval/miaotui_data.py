"""Loads the offline task rows in data/ (made by scripts/make_task_data.py) for lm-evaluation-harness.

The task YAMLs beside this file name these functions as their ``custom_dataset``; lm-eval imports this file
from the YAML's folder, so the paths below are relative to it and the tasks run from any working directory.
"""

import os

import datasets

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def _load(task: str, **_kwargs) -> datasets.DatasetDict:
    files = {split: os.path.join(HERE, f"{task}_{split}.jsonl") for split in ("train", "test")}
    missing = [p for p in files.values() if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{missing[0]} is missing: run python scripts/make_task_data.py")
    return datasets.DatasetDict({split: datasets.Dataset.from_json(path) for split, path in files.items()})


def load_sentiment(**kwargs) -> datasets.DatasetDict:
    return _load("sentiment", **kwargs)


def load_topic(**kwargs) -> datasets.DatasetDict:
    return _load("topic", **kwargs)


def load_translate(**kwargs) -> datasets.DatasetDict:
    return _load("translate", **kwargs)
