"""Customer.io's common person attributes, and the headers that look like them.

A CSV header becomes a trait under its own name, so ``Email Address`` reaches Customer.io
as a trait ``"Email Address"`` and the person gets no ``email``. :func:`suggest_traits`
finds such headers so that the importer can suggest a ``--map`` rule (it never renames a
column by itself: a rename the user did not ask for would be worse than a hint).

>>> suggest_traits(["id", "Email Address", "plan"], mapped=set())
[('Email Address', 'email')]
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable

KNOWN_TRAITS: dict[str, tuple[str, ...]] = {
    "email": ("email", "email address", "e-mail", "e-mail address", "mail", "email_address"),
    "first_name": ("first name", "firstname", "given name", "forename"),
    "last_name": ("last name", "lastname", "surname", "family name"),
    "name": ("full name", "fullname", "display name"),
    "phone": ("phone", "phone number", "telephone", "mobile", "mobile number", "cell phone"),
    "created_at": ("created at", "created", "signup date", "signed up", "sign up date",
                   "registration date", "date created", "created date"),
    "company": ("company", "company name", "organization", "organisation"),
    "title": ("job title", "position"),
    "city": ("city", "town"),
    "country": ("country", "country code"),
    "timezone": ("timezone", "time zone", "tz"),
    "language": ("language", "locale"),
    "unsubscribed": ("unsubscribed", "opted out", "opt out"),
}
"""Attribute -> header spellings (compared lowercased, with ``_``, ``-`` and runs of spaces
made one space) that mean it."""

_SPACES = re.compile(r"[\s_\-]+")
_BY_SPELLING = {
    _SPACES.sub(" ", spelling.lower()).strip(): trait
    for trait, spellings in KNOWN_TRAITS.items() for spelling in (trait, *spellings)
}


def _normal(header: str) -> str:
    return _SPACES.sub(" ", header.lower()).strip()


def known_trait(header: str) -> str | None:
    """The Customer.io attribute a header means, or None."""
    return _BY_SPELLING.get(_normal(header))


def suggest_traits(header: Iterable[str], *, mapped: Collection[str]) -> list[tuple[str, str]]:
    """(column, attribute) for each column not named in ``mapped`` whose name looks like a
    known attribute without being it exactly."""
    names = list(header)
    taken = set(names)
    out: list[tuple[str, str]] = []
    for column in names:
        if column in mapped:
            continue
        trait = known_trait(column)
        if trait is not None and trait != column and trait not in taken:
            out.append((column, trait))
    return out
