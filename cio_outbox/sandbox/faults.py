"""The sandbox's configuration and the faults it injects: rate limiting, random 429s and
5xx answers, latency and poison events.

One :class:`Faults` per sandbox holds the current :class:`Config`, the token bucket and the
random number generator, seeded so that a run with a seed answers the same way every time.
"""

from __future__ import annotations

import dataclasses
import math
import random
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

CONFIG_FIELDS = frozenset(
    {"fail_rate", "throttle_rate", "rate_limit", "latency", "reject_events", "seed",
     "named_errors"}
)
_INJECTED_STATUSES = (500, 502, 503)


@dataclasses.dataclass(frozen=True)
class Config:
    fail_rate: float = 0.0
    rate_limit: float | None = None
    latency: float = 0.0
    reject_events: frozenset[str] = frozenset()
    throttle_rate: float = 0.0
    # Customer.io answers an invalid request with one sentence, {"meta": {"error": "..."}}.
    # Naming each bad item ({"meta": {"errors": [{"field": "batch[3].userId", ...}]}}) is
    # this sandbox's invention, so it is only on when asked for.
    named_errors: bool = False

    def public(self) -> dict[str, Any]:
        return {
            "fail_rate": self.fail_rate,
            "throttle_rate": self.throttle_rate,
            "rate_limit": self.rate_limit,
            "latency": self.latency,
            "reject_events": sorted(self.reject_events),
            "named_errors": self.named_errors,
        }


def _number(name: str, value: Any, *, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number")
    if not low <= value <= high or math.isnan(value):
        raise ValueError(f"{name} must be between {low} and {high}")
    return float(value)


def build_config(base: Config, changes: Mapping[str, Any]) -> Config:
    """``base`` with ``changes`` applied; ValueError naming an unknown field or a bad value."""
    unknown = set(changes) - CONFIG_FIELDS
    if unknown:
        raise ValueError(
            f"unknown config fields: {sorted(unknown)}; known: {sorted(CONFIG_FIELDS)}"
        )
    fields: dict[str, Any] = {}
    if "fail_rate" in changes:
        fields["fail_rate"] = _number("fail_rate", changes["fail_rate"], low=0.0, high=1.0)
    if "throttle_rate" in changes:
        fields["throttle_rate"] = _number("throttle_rate", changes["throttle_rate"],
                                          low=0.0, high=1.0)
    if "rate_limit" in changes:
        rate = changes["rate_limit"]
        if rate is not None:
            rate = _number("rate_limit", rate, low=0.0)
            if rate <= 0:
                raise ValueError("rate_limit must be positive or None")
        fields["rate_limit"] = rate
    if "latency" in changes:
        fields["latency"] = _number("latency", changes["latency"], low=0.0)
    if "reject_events" in changes:
        events = changes["reject_events"]
        if isinstance(events, str) or not isinstance(events, Iterable):
            raise ValueError("reject_events must be a list of event names")
        names = list(events)
        if not all(isinstance(n, str) for n in names):
            raise ValueError("reject_events must be a list of event names")
        fields["reject_events"] = frozenset(names)
    if "named_errors" in changes:
        if not isinstance(changes["named_errors"], bool):
            raise ValueError("named_errors must be true or false")
        fields["named_errors"] = changes["named_errors"]
    if "seed" in changes and changes["seed"] is not None and (
        isinstance(changes["seed"], bool) or not isinstance(changes["seed"], int)
    ):
        raise ValueError("seed must be an integer or None")
    return dataclasses.replace(base, **fields)


def config_from(
    fail_rate: float = 0.0,
    rate_limit: float | None = None,
    latency: float = 0.0,
    reject_events: Iterable[str] = (),
    throttle_rate: float = 0.0,
    named_errors: bool = False,
) -> Config:
    return build_config(Config(), {
        "fail_rate": fail_rate, "rate_limit": rate_limit, "latency": latency,
        "reject_events": list(reject_events), "throttle_rate": throttle_rate,
        "named_errors": named_errors,
    })


class Faults:
    """The current config, the rate limit's token bucket and the seeded injection RNG."""

    def __init__(self, config: Config, seed: int | None) -> None:
        self._lock = threading.Lock()
        self.config = config
        self._seed = seed
        self._rng = random.Random(seed)
        self._reset_bucket()

    def _reset_bucket(self) -> None:
        rate = self.config.rate_limit
        self._tokens = max(1.0, rate) if rate is not None else 0.0
        self._bucket_at = time.monotonic()

    def reset(self) -> None:
        """Refill the bucket and restart the seeded sequence (the config stays)."""
        with self._lock:
            self._reset_bucket()
            if self._seed is not None:
                self._rng.seed(self._seed)

    def configure(self, changes: Mapping[str, Any]) -> Config:
        with self._lock:
            new = build_config(self.config, changes)
            old_rate = self.config.rate_limit
            self.config = new
            if "rate_limit" in changes and new.rate_limit != old_rate:
                self._reset_bucket()
            if "seed" in changes:
                self._seed = changes["seed"]
                self._rng.seed(self._seed)
            return new

    def take_token(self, cfg: Config) -> int | None:
        """None when the request may pass, else the seconds to wait (Retry-After)."""
        rate = cfg.rate_limit
        if rate is None:
            return None
        burst = max(1.0, rate)
        with self._lock:
            now = time.monotonic()
            self._tokens = min(burst, self._tokens + (now - self._bucket_at) * rate)
            self._bucket_at = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return None
            return max(1, math.ceil((1.0 - self._tokens) / rate))

    def injected_throttle(self, cfg: Config) -> bool:
        if cfg.throttle_rate <= 0.0:
            return False  # no draw: seeded fail_rate sequences stay as without throttling
        with self._lock:
            return self._rng.random() < cfg.throttle_rate

    def injected_failure(self, cfg: Config) -> int | None:
        if cfg.fail_rate <= 0.0:
            return None
        with self._lock:
            if self._rng.random() < cfg.fail_rate:
                return self._rng.choice(_INJECTED_STATUSES)
        return None
