"""The retrieval protocols and split names shared by the feature store, ingest and synthetic data.

A dataset has the splits ``train``, ``query`` and ``database``. Under two protocols one of them is another
split of the same dataset and is not stored twice (REFERENCE.md §2, §8):

* ``query_is_database`` (FCVID): the queries are the whole test set, which is also the database; a query's
  match with itself is counted.
* ``database_is_train`` (UCF101, HMDB51): the database is the training split; the queries are the test split.
* ``separate`` (ActivityNet): distinct query and database splits.
"""

from __future__ import annotations

from typing import Literal

Protocol = Literal["query_is_database", "database_is_train", "separate"]

PROTOCOLS: tuple[Protocol, ...] = ("query_is_database", "database_is_train", "separate")
SPLITS: tuple[str, ...] = ("train", "query", "database")
DATASET_PROTOCOLS: dict[str, Protocol] = {
    "fcvid": "query_is_database",
    "activitynet": "separate",
    "ucf101": "database_is_train",
    "hmdb51": "database_is_train",
}

_ALIASES: dict[str, dict[str, str]] = {
    "query_is_database": {"query": "database"},
    "database_is_train": {"database": "train"},
    "separate": {},
}


def stored_split(protocol: Protocol, split: str) -> str:
    """Name of the split that actually holds ``split``'s videos under ``protocol``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if protocol not in _ALIASES:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    return _ALIASES[protocol].get(split, split)


def queries_are_database(protocol: Protocol) -> bool:
    """Whether the query and database splits are the same stored split (encode it once)."""
    return stored_split(protocol, "query") == stored_split(protocol, "database")


def stored_splits(protocol: Protocol) -> tuple[str, ...]:
    """The distinct splits a store of this protocol holds, in the order train, query, database."""
    return tuple(s for s in SPLITS if stored_split(protocol, s) == s)
