"""The one path from a call to an outbox row.

Every way in (``Outbox.enqueue``, ``enqueue_many``, ``enqueue_rows``, the operations, the
file importers and the CLI) ends in :func:`prepare`, which for each call:

1. resolves the messageId: the caller's, else the idempotency key's, else an identity the
   caller derived from content (file imports), else a new time-ordered UUIDv7;
2. stamps the event time: a call without ``timestamp`` gets the time of enqueue
   (ISO-8601 UTC with milliseconds), so Customer.io dates it when it happened, not when a
   worker sent it;
3. validates once: the pydantic models (their error texts are the library's), reached
   through a fast check of the common shapes that defers to pydantic for anything else;
   a track call named like a semantic event is checked against the catalogue in the
   same pass;
4. encodes once, to the exact bytes later sent, and takes the size from those bytes.

A JSONL line of a file import is first offered to :func:`line_row`: a compiled check of
the same shapes (msgspec) that, for a line needing nothing but its messageId, timestamp
and library context, writes the row from the line's own bytes with those fields added.

:func:`write` writes prepared rows in chunked transactions with the cyclic garbage
collector paused while a chunk is built, and counts what was added and skipped.
"""

from __future__ import annotations

import datetime as _dt
import functools
import gc
import hashlib
import operator
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import islice
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
import orjson

from cio_outbox.results import EnqueueResult, Rejection
from cio_outbox.storage.base import CHUNK_ROWS, NewRow, Storage
from cio_outbox.wire import (
    _CANONICAL_TIMESTAMP,
    LIBRARY,
    MAX_MESSAGE_BYTES,
    MessageError,
    check_rules,
    encode_wire,
    json_form,
    message_id_for,
    new_message_id,
)

if TYPE_CHECKING:  # the models load only when a call needs them (see SHAPES)
    from cio_outbox.messages import Message

__all__ = [
    "BOTH_IDS",
    "line_message_id",
    "line_row",
    "now_timestamp",
    "prepare",
    "prepare_many",
    "write",
]

BOTH_IDS = "give either messageId or idempotency_key, not both"


# -- event time --------------------------------------------------------------------------

_last_ms = -1
_last_text = ""


def now_timestamp() -> str:
    """The current time as the API wants it: ``2024-05-01T12:00:00.123Z`` (UTC)."""
    global _last_ms, _last_text
    ms = time.time_ns() // 1_000_000
    if ms != _last_ms:  # a bulk import stamps thousands of calls per millisecond
        moment = _dt.datetime.fromtimestamp(ms / 1000, _dt.UTC)
        _last_text = (
            f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T{moment.hour:02d}:"
            f"{moment.minute:02d}:{moment.second:02d}.{ms % 1000:03d}Z"
        )
        _last_ms = ms
    return _last_text


# -- identity from content ---------------------------------------------------------------


_run_hexes: dict[str, str] = {}  # a plain dict: an lru_cache call cost more than the hash


def _run_hex(run: str) -> str:
    found = _run_hexes.get(run)
    if found is None:
        if len(_run_hexes) > 64:
            _run_hexes.clear()
        found = _run_hexes[run] = hashlib.blake2b(run.encode("utf-8"),
                                                  digest_size=4).hexdigest()
    return found


def line_message_id(run: str, line: int, content: bytes) -> str:
    """The messageId of the call at ``line`` of an import named ``run``, holding ``content``.

    A UUIDv8 (RFC 9562) laid out as run (32 bits), line number (40 bits), content hash
    (48 bits): the same content at the same place gives the same id (a rerun adds nothing),
    different content gives a different id (a new export under the same name, an edited
    line), and the ids of one import grow in file order, so inserting them stays at one
    point of the messageId index however large the outbox is.
    """
    number = f"{line:010x}"
    digest = _BLAKE2B_6.copy()  # copying a hasher is cheaper than making one with options
    digest.update(content)
    return (f"{_run_hexes.get(run) or _run_hex(run)}-{number[:4]}-8{number[4:7]}"
            f"-8{number[7:]}-{digest.hexdigest()}")


_BLAKE2B_6 = hashlib.blake2b(digest_size=6)


def line_of(run: str, message_id: str) -> int | None:
    """The line number a :func:`line_message_id` of ``run`` encodes, or None if it is not one."""
    if (len(message_id) != 36 or not message_id.startswith(_run_hex(run))
            or message_id[14] != "8" or message_id[19] != "8"):
        return None
    try:
        return int(message_id[9:13] + message_id[15:18] + message_id[20:23], 16)
    except ValueError:
        return None


# -- validation --------------------------------------------------------------------------


def _is_id(value: Any) -> bool:
    return type(value) is str and bool(value) and not value.isspace()


def _is_message_id(value: Any) -> bool:
    return type(value) is str and 0 < len(value) <= 100 and not value.isspace()


def _is_timestamp(value: Any) -> bool:
    """The form the model keeps as it is (and the document's date-time accepts)."""
    if type(value) is not str or _CANONICAL_TIMESTAMP.fullmatch(value) is None:
        return False
    try:
        _dt.datetime.fromisoformat(value[:-1])
    except ValueError:
        return False
    return True


def _is_dict(value: Any) -> bool:
    return type(value) is dict


def _is_flags(value: Any) -> bool:
    return type(value) is dict and all(type(flag) is bool for flag in value.values())


def _is_event(value: Any) -> bool:
    return type(value) is str and bool(value) and not value.isspace()


def _is_name(value: Any) -> bool:
    return type(value) is str


# What each field must hold for the fast check to vouch for it: exactly what the model
# would accept and keep unchanged. Anything else goes to pydantic, which decides.
_CHECKS: dict[str, Callable[[Any], bool]] = {
    "messageId": _is_message_id,
    "userId": _is_id,
    "anonymousId": _is_id,
    "groupId": _is_id,
    "previousId": _is_id,
    "timestamp": _is_timestamp,
    "originalTimestamp": _is_timestamp,
    "context": _is_dict,
    "traits": _is_dict,
    "properties": _is_dict,
    "integrations": _is_flags,
    "event": _is_event,
    "name": _is_name,
}
# The validators whose rules _CHECKS restates. A model that gains another validator is
# checked by pydantic alone (for the fields it covers, or wholly for a model validator).
_KNOWN_FIELD_VALIDATORS = frozenset(
    {"_ids", "_message_id", "_timestamp", "_event", "_group_id", "_previous_id"}
)
_KNOWN_MODEL_VALIDATORS = frozenset({"_someone"})


class _Shape:
    """What the fast check needs to know about one model: whether it can vouch for its
    calls at all, the check of each field it knows, and the required fields."""

    def __init__(self, call_type: str, usable: bool, fields: tuple[str, ...],
                 required: tuple[str, ...]) -> None:
        self.call_type = call_type
        self.usable = usable
        self.checks: dict[str, Callable[[Any], bool]] = {name: _CHECKS[name] for name in fields}
        self.checks["type"] = _is_name  # the key that chose this shape
        self.required = required
        self._rules: _Rules | None = None

    @property
    def rules(self) -> _Rules:
        if self._rules is None:  # on first use: it reads the OpenAPI document
            self._rules = _Rules.of(self)
        return self._rules


def shape_of_model(model: type[Message]) -> tuple[bool, tuple[str, ...], tuple[str, ...]]:
    """``(usable, fields, required)`` of a model, read from the model itself: whether the
    fast check can vouch for its calls, the fields of :data:`_CHECKS` whose check it
    restates, and its required fields."""
    decorators = model.__pydantic_decorators__
    covered: set[str] = set()
    for name, validator in decorators.field_validators.items():
        if name not in _KNOWN_FIELD_VALIDATORS:
            covered.update(validator.info.fields)
    unknown_model = set(decorators.model_validators) - _KNOWN_MODEL_VALIDATORS
    extra = model.model_config.get("extra")
    # Extra fields allowed or not, the fast check vouches only for the fields it knows:
    # any other field sends the call to pydantic.
    usable = not unknown_model and extra in ("forbid", "allow") and not (
        decorators.root_validators or decorators.model_serializers)
    fields = tuple(name for name in _CHECKS if name in model.model_fields
                   and name not in covered)
    required = tuple(name for name, info in model.model_fields.items() if info.is_required())
    return usable, fields, required


#: :func:`shape_of_model` of each model, stored: reading the models means importing
#: pydantic, most of the package's start-up, and an import of clean lines never needs
#: them. tests/test_intake.py checks this table against the models.
SHAPES: dict[str, tuple[bool, tuple[str, ...], tuple[str, ...]]] = {
    "identify": (True, ("messageId", "userId", "anonymousId", "timestamp", "originalTimestamp",
                        "context", "traits", "integrations"), ()),
    "track": (True, ("messageId", "userId", "anonymousId", "groupId", "timestamp",
                     "originalTimestamp", "context", "properties", "integrations", "event"),
              ("event",)),
    "page": (True, ("messageId", "userId", "anonymousId", "timestamp", "originalTimestamp",
                    "context", "properties", "integrations", "name"), ()),
    "screen": (True, ("messageId", "userId", "anonymousId", "timestamp", "originalTimestamp",
                      "context", "properties", "integrations", "name"), ()),
    "group": (True, ("messageId", "userId", "anonymousId", "groupId", "timestamp",
                     "originalTimestamp", "context", "traits", "integrations"), ("groupId",)),
    "alias": (True, ("messageId", "userId", "anonymousId", "previousId", "timestamp",
                     "originalTimestamp", "context", "integrations"), ("userId", "previousId")),
}


# The rules of the document that each fast check implies: a value it vouches for meets them.
_IMPLIED: dict[Callable[[Any], bool], tuple[dict[str, Any], ...]] = {
    _is_id: ({"type": "string", "minLength": 1},),
    _is_message_id: ({"type": "string", "minLength": 1},),
    _is_event: ({"type": "string", "minLength": 1},),
    _is_name: ({"type": "string"},),
    _is_timestamp: ({"type": "string", "format": "date-time"},),
    _is_dict: ({"type": "object"}, {"type": "object", "properties": {}}),
    _is_flags: ({"type": "object"},
                {"type": "object", "additionalProperties": {"type": "boolean"}}),
}


class _Rules:
    """Which of the document's rules for a call type the fast check already proves, so that
    the compiled schema runs only for calls it does not (read from the document, not
    restated: a rule added to the document is run until a check here implies it).

    ``known`` is False when the schema has a shape this reading does not understand (its
    rules then always run). A field in ``unproven`` always needs the rules; a field in
    ``guarded`` is an object whose rule constrains only the listed keys, so a value holding
    none of them meets it.
    """

    def __init__(self, known: bool, unproven: frozenset[str] = frozenset(),
                 guarded: tuple[tuple[str, frozenset[str]], ...] = ()) -> None:
        self.known = known
        self.unproven = unproven
        self.guarded = guarded

    @classmethod
    def of(cls, shape: _Shape) -> _Rules:
        from cio_outbox import spec

        schema = spec.resolved_schema(shape.call_type)
        if set(schema) - {"type", "required", "anyOf", "properties"} or (
                schema.get("type") != "object"):
            return cls(False)
        if not set(schema.get("required", ())) <= set(shape.required):
            return cls(False)
        branches = schema.get("anyOf")
        if branches is not None:  # the fast check wants userId or anonymousId
            alternatives = {b["required"][0] for b in branches
                            if set(b) == {"required"} and len(b["required"]) == 1}
            if len(alternatives) != len(branches) or not (
                    {"userId", "anonymousId"} <= alternatives):
                return cls(False)
        unproven: set[str] = set()
        guarded: list[tuple[str, frozenset[str]]] = []
        for name, rule in schema.get("properties", {}).items():
            if name == "type":
                if rule != {"const": shape.call_type}:
                    return cls(False)
                continue
            check = shape.checks.get(name)
            if check is None or rule in _IMPLIED.get(check, ()):
                continue  # no such field passes the fast check, or it meets the rule
            if check is _is_dict and set(rule) == {"type", "properties"}:
                guarded.append((name, frozenset(rule["properties"])))
            else:
                unproven.add(name)
        context = schema.get("properties", {}).get("context")
        if context is not None and not _accepts(context, {"library": LIBRARY}):
            unproven.add("context")  # the library context we add would need checking
        return cls(True, frozenset(unproven), tuple(guarded))

    def hold_for(self, line: Any) -> bool:
        """Whether the rules are sure to hold for a decoded line (a struct whose absent
        fields are UNSET) that the compiled check vouched for."""
        if not self.known:
            return False
        for name in self.unproven:
            if getattr(line, name, _UNSET) is not _UNSET:
                return False
        for name, keys in self.guarded:
            value = getattr(line, name, _UNSET)
            if value is not _UNSET and not keys.isdisjoint(value):
                return False
        return True


def _accepts(rule: dict[str, Any], value: Any) -> bool:
    """Whether ``value``, an object of strings (or of such objects), meets ``rule``, when
    the rule is made of object and string types only; False for any other rule. (Compiling
    the context's schema to ask would cost a tenth of a second at every start.)"""
    if type(value) is str:
        return rule == {"type": "string"}
    if type(value) is not dict or set(rule) - {"type", "properties"} or (
            rule.get("type") != "object"):
        return False
    properties = rule.get("properties", {})
    return all(name not in properties or _accepts(properties[name], inner)
               for name, inner in value.items())


_SHAPES = {call_type: _Shape(call_type, *shape) for call_type, shape in SHAPES.items()}


def _fast_wire(call: dict[str, Any], ours: tuple[str, ...] = ()
               ) -> tuple[dict[str, Any], bool] | None:
    """``(call, rules_hold)`` when the fast check vouches for every field of ``call`` (then
    completed in place, ready to encode); ``rules_hold`` says the document's rules
    (messages.check_rules) are sure to hold without running them. None when pydantic
    must decide (anything unusual, and every invalid call). ``ours`` names fields the
    intake itself set (a new messageId, the enqueue time): known good, not checked."""
    kind = call.get("type")
    shape = _SHAPES.get(kind) if type(kind) is str else None
    if shape is None or not shape.usable:
        return None
    key = (kind, ours, *call)
    plan = _KEY_PLANS.get(key, _NO_PLAN)
    if plan is _NO_PLAN:
        if len(_KEY_PLANS) >= _KEY_PLANS_KEPT:
            _KEY_PLANS.clear()
        plan = _KEY_PLANS[key] = _key_plan(shape, key[2:], ours)
    if plan is None:
        return None
    checks, guarded, rules_hold = plan
    for name, check in checks:
        value = call[name]
        if check is _is_id:  # inlined: the commonest checks, called for every message
            if type(value) is not str or not value or value.isspace():
                return None
        elif check is _is_dict:
            if type(value) is not dict:
                return None
        elif not check(value):
            return None
    # Before the library context is added: the rules see the caller's context.
    if rules_hold:
        for name, keys in guarded:
            if not keys.isdisjoint(call[name]):
                rules_hold = False
                break
        if rules_hold and kind == "track" and call["event"] in _semantic_names():
            rules_hold = False
    context = call.get("context")
    if context is None:
        call["context"] = {"library": LIBRARY}
    elif "library" not in context:
        call["context"] = {**context, "library": LIBRARY}
    return call, rules_hold


_KeyPlan = tuple[tuple[tuple[str, Callable[[Any], bool]], ...],
                 tuple[tuple[str, frozenset[str]], ...], bool]
# What the fast check does for calls of one type with one set of keys (in one order) and
# the same fields set by the intake: bulk calls share a few key sets, so which check each
# field needs, which fields are required and which rules can hold are worked out once per
# set, not once per call.
_KEY_PLANS: dict[tuple[Any, ...], _KeyPlan | None] = {}
_KEY_PLANS_KEPT = 4096
_NO_PLAN: Any = object()


def _key_plan(shape: _Shape, keys: tuple[Any, ...], ours: tuple[str, ...]) -> _KeyPlan | None:
    """The value checks of a call with these keys, the guarded objects among them, and
    whether the document's rules can hold without running; None when a key has no
    check, a required field is missing, or the call names nobody."""
    checks: list[tuple[str, Callable[[Any], bool]]] = []
    for name in keys:
        check = shape.checks.get(name)
        if check is None:
            return None
        if name not in ours:
            checks.append((name, check))
    if any(name not in keys for name in shape.required) or (
            "userId" not in keys and "anonymousId" not in keys):
        return None
    rules = shape.rules
    guarded = tuple((name, names) for name, names in rules.guarded if name in keys)
    return tuple(checks), guarded, rules.known and rules.unproven.isdisjoint(keys)


# -- a JSONL line written from its own bytes ----------------------------------------------

# A line of a file import is parsed by a compiled check (msgspec) of exactly the shapes the
# fast check vouches for; when it passes and the document's rules are proven, the row's
# payload is the line's own bytes with the messageId, timestamp and library context added
# at the end: no dict, no re-encoding. Everything else (any other field, a null, an
# escaped character, a context, a semantic event) takes the general path below.

# Ids are checked for blankness after decoding: a regex constraint in the struct costs
# about 1.5 us per field, str.isspace a tenth of that.
_Id = Annotated[str, msgspec.Meta(min_length=1)]
_TYPES: dict[Callable[[Any], bool], Any] = {
    _is_id: _Id,
    _is_event: _Id,
    _is_message_id: Annotated[str, msgspec.Meta(min_length=1, max_length=100)],
    # The form the model keeps (its calendar is checked after decoding).
    _is_timestamp: Annotated[str, msgspec.Meta(pattern=f"^{_CANONICAL_TIMESTAMP.pattern}\\Z")],
    _is_name: str,
    _is_dict: dict[str, Any],
    _is_flags: dict[str, bool],
}
_BLANK_CHECKED = (_is_id, _is_event, _is_message_id)
# The end of a line's payload: the library context and the line's closing brace.
_LIBRARY_TAIL = ',"context":{"library":' + orjson.dumps(LIBRARY).decode("ascii") + "}}"


class _LinePlan:
    """What :func:`line_row` checks after decoding a line of one call type."""

    __slots__ = ("blank_checked", "kind", "rules", "rules_checked", "track")

    def __init__(self, kind: str, shape: _Shape) -> None:
        self.kind = kind
        self.track = kind == "track"
        self.rules = shape.rules
        # A line with a context never gets here: rules on the context alone need no check.
        self.rules_checked = not self.rules.known or bool(self.rules.unproven) or any(
            name != "context" for name, _ in self.rules.guarded)
        self.blank_checked = tuple(  # besides userId, anonymousId and messageId
            name for name, check in shape.checks.items() if check in _BLANK_CHECKED
            and name not in ("userId", "anonymousId", "messageId"))

    def struct(self, shape: _Shape) -> type[msgspec.Struct]:
        fields: list[Any] = []
        for name, check in shape.checks.items():
            if name == "type":
                continue
            kind = _TYPES[check]
            if name in shape.required:
                fields.append((name, kind))
            else:
                fields.append((name, kind | msgspec.UnsetType, msgspec.UNSET))
        fields.sort(key=lambda field: len(field) == 3)  # required fields first
        return msgspec.defstruct(f"{self.kind.title()}Line", fields, tag_field="type",
                                 tag=self.kind, forbid_unknown_fields=True)


# Objects are decoded whole, not kept as raw bytes (msgspec.Raw): raw objects would need a
# scan of the line for numbers out of range (1e400, 5,000 digits), which only decoding
# refuses, and that scan cost more than decoding them (1.5-2.7 us against 0.4-2.8 us more
# for lines of 130 to 1,400 bytes).
@functools.cache
def _line_decoder() -> tuple[Callable[[bytes], Any], dict[type, _LinePlan]]:
    """The compiled check of a line (made on first use), and the plan of each struct."""
    plans: dict[type, _LinePlan] = {}
    for kind, shape in _SHAPES.items():
        if shape.usable:
            plan = _LinePlan(kind, shape)
            plans[plan.struct(shape)] = plan
    return msgspec.json.Decoder(functools.reduce(operator.or_, plans)).decode, plans


def line_row(raw: bytes, run: str, line: int) -> NewRow | None:
    """The row of JSONL line number ``line`` (``raw``, stripped) of import ``run`` when the
    compiled check proves it ready to send as it is, but for its messageId (its
    :func:`line_message_id` unless it has one), its timestamp and the library context;
    None when :func:`prepare` must decide.

    A line repeating a top-level key keeps its bytes; the checks saw the last value,
    the one JSON parsers (Go's, JavaScript's, Python's) keep.
    """
    decode, plans = _line_decoder()
    try:
        # msgspec refuses invalid UTF-8, lone surrogate escapes and numbers out of range.
        call = decode(raw)
    except (msgspec.DecodeError, RecursionError):  # another shape, or invalid, or nested
        return None  # too deeply: the general path decides and explains
    plan = plans[type(call)]
    user_id, anonymous_id, message_id = call.userId, call.anonymousId, call.messageId
    if (user_id is not _UNSET and user_id.isspace()) or (
            anonymous_id is not _UNSET and anonymous_id.isspace()) or (
            message_id is not _UNSET and message_id.isspace()):
        return None  # blank: the models explain
    for name in plan.blank_checked:
        value = getattr(call, name)
        if value is not _UNSET and value.isspace():
            return None
    person = user_id or anonymous_id
    if person is _UNSET:
        return None  # a group's track: the models decide
    stamp = call.timestamp
    if (stamp is not _UNSET and not _is_timestamp(stamp)) or (
            call.originalTimestamp is not _UNSET and not _is_timestamp(
                call.originalTimestamp)):
        return None  # not a date: the models explain
    if call.context is not _UNSET or (plan.rules_checked and not plan.rules.hold_for(call)) or (
            plan.track and call.event in _semantic_names()):
        return _line_checked(call, plan, raw, run, line)
    # One f-string per case: adding the parts one by one cost 0.2 us a line (3.2 -> 3.4).
    if message_id is _UNSET:
        message_id = line_message_id(run, line, raw)
        if stamp is _UNSET:
            tail = f',"messageId":"{message_id}","timestamp":"{now_timestamp()}"{_LIBRARY_TAIL}'
        else:
            tail = f',"messageId":"{message_id}"{_LIBRARY_TAIL}'
    elif stamp is _UNSET:
        tail = f',"timestamp":"{now_timestamp()}"{_LIBRARY_TAIL}'
    else:
        tail = _LIBRARY_TAIL
    # The tail is ASCII (our id, our timestamp, the library): its bytes are its characters.
    size = len(raw) - 1 + len(tail)
    if size > MAX_MESSAGE_BYTES:
        return None  # the general path explains
    try:
        text = _splice(raw, tail)
    except UnicodeDecodeError:
        return None  # the reader explains
    return NewRow(message_id, run, plan.kind, person, text, size)


def _line_checked(line: Any, plan: _LinePlan, raw: bytes, run: str, number: int
                  ) -> NewRow:
    """The row of a line the compiled check vouched for but whose rules must run, or
    whose context needs the library added: as a dict, encoded, with the rules applied."""
    wire: dict[str, Any] = {"type": plan.kind}
    for name in line.__struct_fields__:
        value = getattr(line, name)
        if value is not _UNSET:
            wire[name] = value
    if "messageId" not in wire:
        wire["messageId"] = line_message_id(run, number, raw)
    if "timestamp" not in wire:
        wire["timestamp"] = now_timestamp()
    context = wire.get("context")
    if context is None:
        wire["context"] = {"library": LIBRARY}
    elif "library" not in context:
        wire["context"] = {**context, "library": LIBRARY}
    return _row(wire, encode_wire(wire), False, True, run)


def _splice(raw: bytes, tail: str) -> str:
    """The payload of a line: its text without the closing brace, then the fields added
    and the brace (its one encoding). Raises UnicodeDecodeError for a line not UTF-8."""
    return raw[:-1].decode("utf-8") + tail


_UNSET = msgspec.UNSET




@functools.cache
def _semantic_names() -> frozenset[str]:
    from cio_outbox.semantic import SEMANTIC_EVENTS  # reads the OpenAPI document once

    return frozenset(SEMANTIC_EVENTS)


@functools.cache
def _own_rules(event: str) -> tuple[Callable[[Any], Any], ...]:
    """The compiled checks a semantic event adds to the track schema (its own allOf part)."""
    from cio_outbox import spec

    track = set(spec._validators("track"))
    return tuple(v for v in spec._validators(spec.semantic_schema_names()[event])
                 if v not in track)


def check_semantic(wire: Mapping[str, Any]) -> None:
    """A track call named like a semantic event must carry what that event needs, whoever
    wrote it (the API refuses it otherwise). ``wire`` holds JSON values only.

    The model has checked the track itself; only the event's own rules run here, and the
    full check (with its explanation) only when one of them fails.
    """
    name = wire["event"]
    try:
        for rule in _own_rules(name):
            rule(wire)
        return
    except Exception:  # fastjsonschema's error: explained by the full check below
        pass
    from cio_outbox.semantic import check_semantic as check

    try:
        check(name, wire.get("properties"), user_id=wire.get("userId"),
              anonymous_id=wire.get("anonymousId"), context=wire.get("context"))
    except ValueError as exc:
        from cio_outbox.spec import check_call

        message = {k: wire[k] for k in ("type", "event", "userId", "anonymousId",
                                        "properties", "context") if k in wire}
        found = check_call("track", message)
        raise MessageError(str(exc), field=found[0].field if found else None) from None


# -- the row -----------------------------------------------------------------------------


def prepare(
    call: Mapping[str, Any] | Message,
    run: str | None = None,
    *,
    idempotency_key: str | None = None,
    identity: str | None = None,
    owned: bool = False,
    plain: bool = False,
) -> NewRow:
    """The outbox row for one call (wire-shape mapping or :class:`Message`).

    ``identity`` is the messageId to use when the call carries none and no idempotency key
    is given (importers derive it from the content's place). ``owned=True`` lets the
    mapping be completed in place (the caller made it and will not reuse it);
    ``plain=True`` says it holds JSON values only (it was parsed from JSON or CSV).
    Raises :class:`MessageError` naming the field; nothing is written then.
    """
    if type(call) is not dict and _is_message(call):
        if idempotency_key is not None:
            call = call.model_copy(update={"messageId": message_id_for(idempotency_key)})
        wire = call.wire()  # validated when it was built
        if "timestamp" not in wire:
            wire["timestamp"] = now_timestamp()
        payload = encode_wire(wire)
        rules_hold = False
    else:
        wire, payload, rules_hold = _checked(call, idempotency_key, identity, owned)
    return _row(wire, payload, rules_hold, plain, run)


def _is_message(call: Any) -> bool:
    """Whether ``call`` is a :class:`Message` (none exists while the models are not loaded)."""
    models = sys.modules.get("cio_outbox.messages")
    return models is not None and isinstance(call, models.Message)


def _row(wire: dict[str, Any], payload: bytes, rules_hold: bool, plain: bool,
         run: str | None) -> NewRow:
    """The row of a validated wire call and its bytes, once the document's rules hold."""
    call_type = wire["type"]
    if not rules_hold:
        # JSON values, as the API will see them (decoded again unless they already are).
        seen = wire if plain else json_form(payload)
        if call_type == "track" and wire["event"] in _semantic_names():
            check_semantic(seen)  # first, for its message naming what the event requires
        # The one rule set: the checks the sandbox applies to what arrives.
        check_rules(seen)
    return NewRow(wire["messageId"], run or "", call_type,
                  wire.get("userId") or wire.get("anonymousId") or "",
                  payload.decode("utf-8"), len(payload))


def _checked(call: Mapping[str, Any], idempotency_key: str | None, identity: str | None,
             owned: bool) -> tuple[dict[str, Any], bytes, bool]:
    """The wire dict of a mapping, its bytes, and whether the document's rules are known
    to hold for it: id resolved, time stamped, validated."""
    if type(call) is dict:
        fields: dict[str, Any] = call if owned else dict(call)
    elif isinstance(call, Mapping):
        fields = dict(call)
    else:
        raise MessageError("a call must be a JSON object", field="type")
    ours: tuple[str, ...] = ()
    if idempotency_key is not None:
        if fields.get("messageId") is not None:
            raise MessageError(BOTH_IDS, field="messageId")
        fields["messageId"] = message_id_for(idempotency_key)
        ours = ("messageId",)
    elif fields.get("messageId") is None:
        fields["messageId"] = identity or new_message_id()
        ours = ("messageId",)
    if fields.get("timestamp") is None:
        fields["timestamp"] = now_timestamp()
        ours = (*ours, "timestamp")
    vouched = _fast_wire(fields, ours)
    if vouched is not None:
        wire, rules_hold = vouched
        try:
            return wire, encode_wire(wire, fallback=False), rules_hold
        except TypeError:
            pass  # what orjson refuses (an integer key, a huge integer): pydantic decides
    from cio_outbox.messages import from_wire  # pydantic decides, and explains

    wire = from_wire(fields).wire()
    return wire, encode_wire(wire), False


def prepare_many(
    calls: Iterable[tuple[int, Mapping[str, Any] | Message, str | None, str | None]],
    run: str | None,
    rejected: Callable[[int, MessageError], None],
    *,
    owned: bool = False,
) -> Iterator[NewRow]:
    """Rows for ``(index, call, idempotency_key, identity)`` items; each invalid call goes
    to ``rejected(index, error)`` instead."""
    for index, call, key, identity in calls:
        try:
            yield prepare(call, run, idempotency_key=key, identity=identity, owned=owned)
        except MessageError as exc:
            rejected(index, exc)


def _plain_rows(calls: Iterable[Mapping[str, Any] | Message], start: int, run: str | None,
                rejected: Callable[[int, MessageError], None]) -> Iterator[NewRow]:
    """:func:`prepare_many` of calls without keys or identities, numbered from ``start``:
    a dict goes straight to the checks (the commonest bulk call, without the per-call
    item tuple and keyword call)."""
    checked, row = _checked, _row
    for index, call in enumerate(calls, start):
        try:
            if type(call) is dict:
                wire, payload, rules_hold = checked(call, None, None, False)
                yield row(wire, payload, rules_hold, False, run)
            else:
                yield prepare(call, run)
        except MessageError as exc:
            rejected(index, exc)


def write(storage: Storage, rows: Iterable[NewRow], chunk_size: int = CHUNK_ROWS
          ) -> tuple[int, int]:
    """Write rows in transactions of ``chunk_size``; returns (added, skipped).

    Each chunk is built with the cyclic garbage collector paused: building allocates a few
    objects per call, none in a cycle, yet each burst makes the collector walk every live
    container (for a caller holding a million dicts, all of them). It runs again between
    chunks, so a caller's cyclic garbage stays bounded by a chunk.
    """
    iterator = iter(rows)
    added = offered = 0
    while True:
        enabled = gc.isenabled()
        gc.disable()
        try:
            chunk = list(islice(iterator, chunk_size))
        finally:
            if enabled:
                gc.enable()
        if not chunk:
            return added, offered - added
        offered += len(chunk)
        added += storage.insert(chunk, chunk_size=len(chunk))


def enqueue_many(
    storage: Storage,
    calls: Iterable[Mapping[str, Any] | Message],
    *,
    run: str | None = None,
    idempotency_keys: Iterable[str] | Callable[[int, Any], str] | None = None,
    on_invalid: str = "skip",
    chunk_size: int = CHUNK_ROWS,
    start: int = 0,
) -> EnqueueResult:
    """:meth:`cio_outbox.Outbox.enqueue_many` (see there)."""
    check_on_invalid(on_invalid)
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    result = EnqueueResult()

    def reject(index: int, exc: MessageError) -> None:
        result.rejected.append(Rejection(index, str(exc), exc.field))

    if callable(idempotency_keys):
        key_of = idempotency_keys
        items: Iterable[Any] | None = (
            (index, call, key_of(index, call), None) for index, call in enumerate(calls, start))
    elif idempotency_keys is not None:
        keys = iter(idempotency_keys)
        items = ((index, call, next(keys), None) for index, call in enumerate(calls, start))
    else:
        items = None
    rows: Iterable[NewRow] = (
        _plain_rows(calls, start, run, reject) if items is None
        else prepare_many(items, run, reject))
    if on_invalid == "raise":
        rows = list(rows)
        if result.rejected:
            first = result.rejected[0]
            raise MessageError(
                f"{len(result.rejected)} call(s) invalid, nothing written; "
                f"first at index {first.index}: {first.error}",
                field=first.field,
            )
    result.added, result.skipped = write(storage, rows, chunk_size)
    return result


def enqueue_one(storage: Storage, call: Mapping[str, Any] | Message, *, run: str | None = None,
                idempotency_key: str | None = None) -> EnqueueResult:
    """:meth:`cio_outbox.Outbox.enqueue`: one call, one transaction."""
    row = prepare(call, run, idempotency_key=idempotency_key)
    added = storage.insert([row])
    return EnqueueResult(added=added, skipped=1 - added, message_ids=[row.message_id])


def check_on_invalid(on_invalid: str) -> None:
    if on_invalid not in ("skip", "raise"):
        raise ValueError("on_invalid must be 'skip' or 'raise'")
