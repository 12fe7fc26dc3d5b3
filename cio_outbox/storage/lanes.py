"""Lanes: which ordered stream a person's rows travel in.

A person's rows all get one lane, a stable hash of the person modulo the outbox's number
of lanes (fixed when the outbox is created, stored as the rows of its ``lanes`` table). A
claim takes the next rows of lanes that have nothing in flight, so one person's messages
leave in order while other lanes are sent in parallel. The hash is blake2b (64 bits), not
``hash()``: it must give every process, on every machine, the same lane for a person.

Why 64 lanes: a claim reads the head of every lane (a few index probes each, about
0.3 ms for 64 in SQLite). Alone, a claim takes every free lane (consecutive rows); when
others want rows it takes its share of the free lanes, never fewer than ``LANES // 8``:
with 64 lanes, up to 8 senders can each hold a full request's worth of lanes on a file of
few people, and a file of many people (10,000) still fills 500 KB bodies from 8 lanes.
"""

from __future__ import annotations

from functools import lru_cache
from hashlib import blake2b

#: Lanes of a new outbox.
LANES = 64


@lru_cache(maxsize=65_536)
def _digest(person: str) -> int:
    return int.from_bytes(blake2b(person.encode("utf-8"), digest_size=8).digest(), "big")


def lane_of(person: str, lanes: int = LANES) -> int:
    """The lane of a person's rows in an outbox of ``lanes`` lanes."""
    return _digest(person) % lanes


def lanes_per_claim(lanes: int) -> int:
    """The fewest lanes a claim that shares the free lanes with others takes."""
    return max(1, lanes // 8)
