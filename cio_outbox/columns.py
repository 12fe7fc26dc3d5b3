"""Typed column mapping: which source column becomes which trait, and with what type.

A rule is written ``COLUMN=TARGET[:TYPE]``, as on the command line::

    --map "Lifetime Value=traits.ltv:float"   # rename and cast
    --map "Age=:int"                          # keep the name, cast
    --map "Internal Notes=ignore"             # leave the column out

``TYPE`` is one of ``str`` (the default: values stay as they are), ``int``, ``float``,
``bool`` (true/false, yes/no, y/n, t/f, 1/0, any case) or ``date`` (an ISO-8601 date or
date-time, sent as an ISO-8601 string; a date-time without a zone is taken as UTC).
Headers and column names in rules are trimmed of surrounding spaces. Empty cells and
missing values (None, NaN, NaT) are left out: an empty cell never overwrites a trait.

Used by :mod:`cio_outbox.sync` and by the CSV importer (:mod:`cio_outbox.importers`, where
the target may also be ``properties.NAME`` for track rows): one syntax for both commands.
"""

from __future__ import annotations

import datetime as _dt
import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

TYPES = ("str", "int", "float", "bool", "date")
IGNORE = "ignore"
_TRUE = frozenset({"true", "yes", "y", "t", "1"})
_FALSE = frozenset({"false", "no", "n", "f", "0"})
_PLAIN = frozenset({str, int, bool})


class MappingError(ValueError):
    """A mapping rule is malformed or names a column the source does not have."""


class ValueProblem(ValueError):
    """One value cannot take its column's type; ``field`` names the trait."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class ColumnRule:
    """``column`` becomes trait ``name`` (None: left out) converted to ``type``."""

    column: str
    name: str | None
    type: str = "str"

    @classmethod
    def parse(cls, text: str, *, prefix: str = "traits") -> ColumnRule:
        """``"Lifetime Value=traits.ltv:float"`` -> ColumnRule("Lifetime Value", "ltv", "float")."""
        column, sep, target = text.partition("=")
        column = column.strip()
        if not sep or not column:
            raise MappingError(f"{text!r} is not COLUMN=TARGET[:TYPE]")
        target = target.strip()
        kind = "str"
        if ":" in target:
            target, _, kind = target.rpartition(":")
            target, kind = target.strip(), kind.strip().lower()
            if kind not in TYPES:
                raise MappingError(f"{text!r}: type {kind!r} is not one of {', '.join(TYPES)}")
        if target == IGNORE:
            return cls(column, None, kind)
        if not target:
            return cls(column, column, kind)
        head, dot, name = target.partition(".")
        if dot and head == prefix and name.strip():
            return cls(column, name.strip(), kind)
        raise MappingError(
            f"{text!r}: target {target!r} is not {prefix}.NAME, ignore, or empty (keep the name)"
        )


def parse_rules(texts: Iterable[str], *, prefix: str = "traits") -> list[ColumnRule]:
    rules = [ColumnRule.parse(text, prefix=prefix) for text in texts]
    seen: set[str] = set()
    for rule in rules:
        if rule.column in seen:
            raise MappingError(f"column {rule.column!r} is mapped twice")
        seen.add(rule.column)
    return rules


def present(value: Any) -> bool:
    """False for values that mean "no value": None, "", NaN, NaT, pandas NA."""
    kind = type(value)
    if kind is str:
        return value != ""
    if kind in _PLAIN:
        return True
    if value is None:
        return False
    if kind is float:
        return value == value
    name = kind.__name__
    if name in ("NaTType", "NAType"):
        return False
    if kind.__module__ == "numpy":
        try:
            return bool(value == value)
        except (TypeError, ValueError):
            return True
    return True


def plain(value: Any) -> Any:
    """A JSON-ready value: numpy scalars, datetimes, dates, Decimals made plain."""
    kind = type(value)
    if kind in _PLAIN or kind is float or value is None:
        return value
    if isinstance(value, _dt.datetime):
        return _iso_datetime(value)
    if isinstance(value, _dt.date):
        return value.isoformat()
    if kind.__module__ == "numpy":
        if kind.__name__ == "datetime64":
            return plain(value.astype("datetime64[us]").item())
        return value.item()
    if kind.__name__ == "Decimal":
        return float(value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    return value


def _iso_datetime(value: _dt.datetime) -> str:
    value = value.replace(tzinfo=_dt.UTC) if value.tzinfo is None else value.astimezone(_dt.UTC)
    return value.isoformat().replace("+00:00", "Z")


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise ValueError
    return int(str(value).strip())


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError
    number = float(value.strip() if isinstance(value, str) else value)
    if not math.isfinite(number):
        raise ValueError
    return number


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError


def _to_date(value: Any) -> str:
    if isinstance(value, (_dt.datetime, _dt.date)) or type(value).__module__ == "numpy":
        return plain(value)  # type: ignore[no-any-return]
    text = str(value).strip()
    if len(text) == 10:
        return _dt.date.fromisoformat(text).isoformat()
    return _iso_datetime(_dt.datetime.fromisoformat(text.replace("Z", "+00:00")))


_CONVERTERS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "int": (_to_int, "an integer"),
    "float": (_to_float, "a finite number"),
    "bool": (_to_bool, "true/false, yes/no, y/n, t/f or 1/0"),
    "date": (_to_date, "an ISO-8601 date or date-time (2024-05-01, 2024-05-01T12:00:00Z)"),
}


class Plan:
    """Rules applied to one header: trait names in sorted order, each with its position.

    ``traits(values)`` turns a row (a sequence aligned with the header) into a dict of
    traits whose keys are in sorted order, so equal traits always serialize alike.
    """

    def __init__(self, header: Sequence[str], rules: Sequence[ColumnRule],
                 exclude: Iterable[str] = (), *, prefix: str = "traits") -> None:
        names = [str(name).strip() for name in header]
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise MappingError(f"the header names column {name!r} twice")
            seen.add(name)
        by_column = {rule.column: rule for rule in rules}
        missing = [column for column in by_column if column not in seen]
        if missing:
            raise MappingError(
                f"column(s) {', '.join(map(repr, missing))} not in the source "
                f"({', '.join(names)})"
            )
        excluded = set(exclude)
        entries: list[tuple[str, int, Callable[[Any], Any] | None, str]] = []
        targets: dict[str, str] = {}
        for index, column in enumerate(names):
            if column in excluded:
                continue
            rule = by_column.get(column, ColumnRule(column, column))
            if rule.name is None:
                continue
            if rule.name in targets:
                raise MappingError(f"columns {targets[rule.name]!r} and {column!r} both "
                                   f"become trait {rule.name!r}")
            targets[rule.name] = column
            converter, expected = _CONVERTERS.get(rule.type, (None, ""))
            entries.append((rule.name, index, converter, expected))
        entries.sort(key=lambda entry: entry[0])
        self.header = names
        self.prefix = prefix  # names the field in a ValueProblem: traits.NAME, properties.NAME
        self.entries = entries
        self._pairs = [(name, index) for name, index, _, _ in entries]
        self._names = [name for name, _ in self._pairs]
        indexes = [index for _, index in self._pairs]
        self._pick: Callable[[Sequence[Any]], Sequence[Any]] = (
            (lambda values: tuple(values[i] for i in indexes)) if len(indexes) < 2
            else operator.itemgetter(*indexes))
        self._converters = {name: (converter, expected, index)
                            for name, index, converter, expected in entries if converter}
        #: The typed traits and their types: two rows give equal traits when their
        #: :meth:`raw` values are equal under the same signature.
        self.signature = repr([(name, expected)
                               for name, _, converter, expected in entries if converter])

    def raw(self, values: Sequence[Any]) -> dict[str, Any]:
        """The present values of one row by trait name, made plain but not typed yet
        (cheap: a sync compares these, and types only the rows it sends, with
        :meth:`convert`)."""
        out: dict[str, Any] = {}
        for name, index in self._pairs:
            value = values[index]
            if type(value) is str:
                if value != "":
                    out[name] = value
            elif present(value):
                out[name] = plain(value)  # a numpy float and a float are the same value
        return out

    def pick(self, values: Sequence[Any]) -> tuple[Any, ...]:
        """The values that feed traits, in trait-name order ("" and None stand for absent):
        equal picks under one plan mean equal traits."""
        return tuple(self._pick(values))

    @property
    def typed(self) -> bool:
        """Whether any column is converted (else :meth:`raw_text` gives the traits)."""
        return bool(self._converters)

    def raw_text(self, values: Sequence[str]) -> dict[str, str]:
        """:meth:`raw` for a row of strings (CSV), in one comprehension."""
        return {name: value for name, value in zip(self._names, self._pick(values),
                                                   strict=True) if value}

    def convert(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Traits from :meth:`raw` values: typed and made plain; raises ValueProblem."""
        out: dict[str, Any] = {}
        converters = self._converters
        for name, value in raw.items():
            typed = converters.get(name)
            if typed is not None:
                converter, expected, index = typed
                try:
                    value = converter(value)
                except (ValueError, TypeError, OverflowError):
                    raise ValueProblem(
                        f"{self.prefix}.{name}: {value!r} (column {self.header[index]!r}) is "
                        f"not {expected}", field=f"{self.prefix}.{name}") from None
            out[name] = value
        return out

    def traits(self, values: Sequence[Any]) -> dict[str, Any]:
        """The traits of one row; raises :class:`ValueProblem` naming the trait.
        The same as ``convert(raw(values))``, in one pass."""
        out: dict[str, Any] = {}
        for name, index, converter, expected in self.entries:
            value = values[index]
            kind = type(value)
            if kind is str:
                if value == "":
                    continue
            elif not present(value):
                continue
            if converter is not None:
                try:
                    value = converter(value)
                except (ValueError, TypeError, OverflowError):
                    raise ValueProblem(
                        f"{self.prefix}.{name}: {value!r} (column {self.header[index]!r}) is "
                        f"not {expected}", field=f"{self.prefix}.{name}") from None
            elif kind is not str:
                value = plain(value)
            out[name] = value
        return out
