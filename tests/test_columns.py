"""Typed column mapping (cio_outbox.columns): rules, header trimming, casts and their errors."""

from __future__ import annotations

import datetime as dt

import pytest

from cio_outbox.columns import ColumnRule, MappingError, Plan, ValueProblem, parse_rules


def test_a_rule_renames_and_types_a_column() -> None:
    assert ColumnRule.parse("Lifetime Value=traits.ltv:float") == \
        ColumnRule("Lifetime Value", "ltv", "float")
    assert ColumnRule.parse(" Age =:int") == ColumnRule("Age", "Age", "int")
    assert ColumnRule.parse("Notes=ignore") == ColumnRule("Notes", None, "str")
    assert ColumnRule.parse("Email Address=traits.email") == \
        ColumnRule("Email Address", "email", "str")


@pytest.mark.parametrize("text, words", [
    ("no-equals", "COLUMN=TARGET"),
    ("a=traits.x:decimal", "type 'decimal'"),
    ("a=properties.x", "traits.NAME"),
    ("=traits.x", "COLUMN=TARGET"),
])
def test_a_bad_rule_says_what_is_wrong(text: str, words: str) -> None:
    with pytest.raises(MappingError, match=words):
        ColumnRule.parse(text)


def test_a_column_mapped_twice_is_refused() -> None:
    with pytest.raises(MappingError, match="mapped twice"):
        parse_rules(["a=traits.x", "a=traits.y"])


def test_headers_are_trimmed_and_traits_come_sorted() -> None:
    plan = Plan([" id ", " Email Address ", "zeta", "Lifetime Value"],
                parse_rules(["Email Address=traits.email", "Lifetime Value=traits.ltv:float"]),
                exclude=["id"])
    traits = plan.traits(["7", "ada@example.com", "z", "365.69"])
    assert traits == {"email": "ada@example.com", "ltv": 365.69, "zeta": "z"}
    assert list(traits) == ["email", "ltv", "zeta"]


def test_empty_and_missing_values_are_left_out() -> None:
    plan = Plan(["a", "b", "c", "d"], parse_rules(["b=:int"]))
    assert plan.traits(["", "", None, float("nan")]) == {}


@pytest.mark.parametrize("kind, raw, value", [
    ("int", "42", 42), ("int", " -3 ", -3), ("int", 7.0, 7),
    ("float", "365.69", 365.69), ("float", 3, 3.0),
    ("bool", "Yes", True), ("bool", "f", False), ("bool", "1", True), ("bool", True, True),
    ("date", "2024-05-01", "2024-05-01"),
    ("date", "2024-05-01T12:30:00", "2024-05-01T12:30:00Z"),
    ("date", "2024-05-01T14:30:00+02:00", "2024-05-01T12:30:00Z"),
    ("date", dt.date(2024, 5, 1), "2024-05-01"),
    ("str", "02134", "02134"),
])
def test_casts(kind: str, raw: object, value: object) -> None:
    plan = Plan(["x"], [ColumnRule("x", "x", kind)])
    assert plan.traits([raw]) == {"x": value}


@pytest.mark.parametrize("kind, raw", [
    ("int", "4.5"), ("int", "abc"), ("float", "nan"), ("float", "1e999"), ("bool", "maybe"),
    ("date", "03/15/2019"), ("int", True),
])
def test_a_value_that_cannot_take_its_type_names_the_trait_and_column(kind: str,
                                                                      raw: object) -> None:
    plan = Plan(["Raw Column"], [ColumnRule("Raw Column", "target", kind)])
    with pytest.raises(ValueProblem, match=r"traits\.target.*column 'Raw Column'") as caught:
        plan.traits([raw])
    assert caught.value.field == "traits.target"


def test_a_rule_for_a_column_the_source_lacks_is_refused() -> None:
    with pytest.raises(MappingError, match="'Missing' not in the source"):
        Plan(["a"], parse_rules(["Missing=traits.m"]))


def test_two_columns_cannot_become_one_trait() -> None:
    with pytest.raises(MappingError, match="both become trait 'email'"):
        Plan(["Email", "email"], parse_rules(["Email=traits.email"]))


def test_a_duplicate_header_is_refused() -> None:
    with pytest.raises(MappingError, match="twice"):
        Plan(["a", " a"], [])
