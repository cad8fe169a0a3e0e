"""Typed, versioned messages encoded as msgpack maps, validated on decode with a size limit; never pickle.

A message is a frozen dataclass registered under a ``TYPE`` tag. On the wire it is a map with ``t`` (tag),
``v`` (protocol version) and its fields. Decoding checks the size first, then the tag, the version, that every
field has the declared type, and finally the message's own ``check()`` for bounds. Bulk bytes (frames, tensors)
never travel inside a message: they follow it in the same payload (see ``chunk_frame``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import msgpack

from services.common.errors import (
    InvalidField,
    MalformedMessage,
    MessageTooLarge,
    ProtocolError,
    UnknownMessageType,
    UnsupportedVersion,
)

PROTOCOL_VERSION = 1
DEFAULT_MAX_BYTES = 64 * 1024

_REGISTRY: dict[str, type[Message]] = {}
M = TypeVar("M", bound="Message")


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """Base of every wire message; subclasses set TYPE and may override ``check``."""

    TYPE: ClassVar[str] = ""

    def check(self) -> None:
        """Raise InvalidField when a field is out of its bounds; types are already checked."""

    def to_wire(self) -> dict[str, Any]:
        body = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"t": self.TYPE, "v": PROTOCOL_VERSION, **body}


def message(cls: type[M]) -> type[M]:
    """Register a message class under its TYPE tag (a decorator)."""
    if not cls.TYPE or cls.TYPE in _REGISTRY:
        raise ValueError(f"message {cls.__name__} needs a unique TYPE, got {cls.TYPE!r}")
    _REGISTRY[cls.TYPE] = cls
    cls._hints = typing.get_type_hints(cls)  # type: ignore[attr-defined]
    return cls


def encode(msg: Message) -> bytes:
    packed: bytes = msgpack.packb(msg.to_wire(), use_bin_type=True)
    return packed


def decode(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, expect: type[M] | None = None) -> M | Message:
    """Decode and validate one message; every failure is a ProtocolError subclass, never a crash."""
    if len(data) > max_bytes:
        raise MessageTooLarge(f"message of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=max_bytes, max_str_len=max_bytes)
    except Exception as exc:  # msgpack raises several unrelated types for garbage input
        raise MalformedMessage(f"not a msgpack message ({type(exc).__name__}: {exc})") from None
    return from_mapping(obj, expect=expect)


def from_mapping(obj: object, *, expect: type[M] | None = None) -> M | Message:
    """Validate a decoded map (from msgpack or JSON) into its message class."""
    if not isinstance(obj, Mapping):
        raise MalformedMessage(f"a message must be a map, got {type(obj).__name__}")
    tag = obj.get("t", obj.get("type"))
    cls = _REGISTRY.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise UnknownMessageType(f"unknown message type {tag!r}")
    if expect is not None and cls is not expect:
        raise UnknownMessageType(f"expected a {expect.TYPE!r} message, got {tag!r}")
    try:
        return _validated(cls, obj, tag)
    except ProtocolError as exc:
        exc.request_type = tag
        raise


def _validated(cls: type[Message], obj: Mapping[Any, Any], tag: str) -> Message:
    version = obj.get("v", PROTOCOL_VERSION)
    if type(version) is not int or version != PROTOCOL_VERSION:  # true and 1.0 == 1 in Python, not on the wire
        raise UnsupportedVersion(f"protocol version {version!r} is not supported (this peer speaks {PROTOCOL_VERSION})")
    hints: dict[str, Any] = cls._hints  # type: ignore[attr-defined]
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name in obj:
            kwargs[field.name] = _checked(obj[field.name], hints[field.name], field.name)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise InvalidField(f"{tag}: missing required field {field.name!r}")
    msg = cls(**kwargs)
    msg.check()
    return msg


def _checked(value: Any, annotation: Any, name: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _checked(value, option, name)
            except InvalidField:
                continue
        raise InvalidField(f"field {name!r} has the wrong type {type(value).__name__}")
    if annotation is type(None):
        if value is None:
            return None
        raise InvalidField(f"field {name!r} must be null")
    if origin is typing.Literal:
        if value in typing.get_args(annotation):
            return value
        raise InvalidField(f"field {name!r} must be one of {typing.get_args(annotation)}, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise InvalidField(f"field {name!r} must be a list")
        args = typing.get_args(annotation)
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            return tuple(_checked(item, args[0], name) for item in value)
        if len(value) != len(args):
            raise InvalidField(f"field {name!r} must have {len(args)} items, got {len(value)}")
        return tuple(_checked(item, item_type, name) for item, item_type in zip(value, args, strict=True))
    if origin is dict:
        key_type, value_type = typing.get_args(annotation)
        if not isinstance(value, Mapping):
            raise InvalidField(f"field {name!r} must be a map")
        return {_checked(k, key_type, name): _checked(v, value_type, name) for k, v in value.items()}
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, bool):
        raise InvalidField(f"field {name!r} must be an integer, got a boolean")
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise InvalidField(f"field {name!r} must be {annotation.__name__}, got {type(value).__name__}")
    if isinstance(value, str) and not value.isascii():  # the chunk path's ids are ASCII: one C scan, no copy
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # JSON's "\ud800" decodes to a lone surrogate no UTF-8 peer can take
            raise InvalidField(f"field {name!r} is not valid Unicode (a lone surrogate)") from None
    return value
