"""Typed, documented task configs (the role pex_config plays in the LSST stack).

A config is a dataclass whose every field is made with :func:`option` (a scalar or list with a
type, default, one-line doc and optional range/choices) or :func:`subconfig` (a nested config).
The same classes give the JSON schema of ``config/config.yaml``, the ``show-config`` listing,
and the typed objects the tasks read.

Example
-------
>>> @dataclass
... class IsrConfig(Config):
...     do_flat: bool = option(True, "Divide by the master flat?")
...     overscan_fit: str = option("median", "Overscan model", choices=("median", "poly"))
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, fields
from typing import Any


class ConfigError(ValueError):
    """A config option is unknown, has the wrong type, or lies outside its allowed values."""


def option(default, doc: str, *, min=None, max=None, choices=None):
    """A config field with its default and one-line documentation.

    Parameters
    ----------
    default
        Default value (lists are copied per instance).
    doc : str
        One-line description, shown by ``show-config``; give units.
    min, max : float, optional
        Inclusive bounds for numbers.
    choices : sequence, optional
        Allowed values.
    """
    meta = {"doc": doc, "min": min, "max": max, "choices": tuple(choices) if choices else None}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def subconfig(cls, doc: str, *, default=None):
    """A nested config section of class ``cls``.

    ``default`` is an optional factory returning the section's default instance, for a section
    whose defaults differ from its class's (e.g. a detection threshold of 10 instead of 5).
    """
    factory = default or cls
    return dataclasses.field(default_factory=factory, metadata={"doc": doc, "subconfig": cls, "factory": factory})


def merge_into(base: dict, update: dict) -> dict:
    """Recursively merge ``update`` into ``base`` in place (as Snakemake merges configs)."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge_into(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


@dataclass
class Config:
    """Base class of all task configs."""

    def __init_subclass__(cls, **kwargs):
        # List every option with its doc in the class docstring, so help(IsrConfig) shows them.
        super().__init_subclass__(**kwargs)
        lines = []
        for name, annotation in cls.__dict__.get("__annotations__", {}).items():
            f = cls.__dict__.get(name)
            if isinstance(f, dataclasses.Field) and "doc" in f.metadata:
                kind = getattr(f.metadata.get("subconfig"), "__name__", None) or str(annotation)
                default = f.default if f.default is not dataclasses.MISSING else None
                shown = f" (default {default!r})" if default is not None else ""
                lines.append(f"{name} : {kind}{shown}\n    {f.metadata['doc']}")
        if lines:
            cls.__doc__ = (cls.__doc__ or cls.__name__).rstrip() + "\n\nOptions\n-------\n" + "\n".join(lines)

    def validate(self) -> None:
        """Cross-field checks; subclasses override and call ``super().validate()``."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Config):
                value.validate()

    # ------------------------------------------------------------ conversion
    def to_dict(self) -> dict:
        """Nested plain-Python dict of the values."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, Config) else (list(v) if isinstance(v, tuple) else v)
        return out

    @classmethod
    def from_dict(cls, values: dict | None, *, path: str = "") -> "Config":
        """Build a config from (possibly partial) nested values, checking names, types, ranges."""
        values = dict(values or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            where = path or cls.__name__
            raise ConfigError(
                f"unknown option {path + '.' if path else ''}{unknown[0]} in {where}; "
                f"allowed: {', '.join(sorted(known))}"
            )
        kwargs = {}
        hints = typing.get_type_hints(cls)
        for name, f in known.items():
            dotted = f"{path}.{name}" if path else name
            if "subconfig" in f.metadata:
                sub = values.get(name) or {}
                if not isinstance(sub, dict):
                    raise ConfigError(f"option {dotted} is a section; give a mapping, got {sub!r}")
                base = f.metadata["factory"]().to_dict()
                unknown_sub = sorted(set(sub) - set(base))
                if unknown_sub:
                    raise ConfigError(f"unknown option {dotted}.{unknown_sub[0]} in {dotted}; "
                                      f"allowed: {', '.join(sorted(base))}")
                kwargs[name] = f.metadata["subconfig"].from_dict(merge_into(base, sub), path=dotted)
            elif name in values:
                kwargs[name] = _check_value(dotted, values[name], hints[name], f.metadata)
        obj = cls(**kwargs)
        obj.validate()
        return obj

    def hash(self) -> str:
        """Short stable hash of the values (recorded in product headers)."""
        text = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    # ------------------------------------------------------------ documentation
    @classmethod
    def describe(cls, prefix: str = "", _default=None) -> list[dict]:
        """One dict per leaf option: name (dotted), type, default, doc, min, max, choices."""
        rows = []
        hints = typing.get_type_hints(cls)
        instance = _default if _default is not None else cls()
        for f in fields(cls):
            name = f"{prefix}{f.name}"
            default = getattr(instance, f.name)
            if "subconfig" in f.metadata:
                rows.extend(f.metadata["subconfig"].describe(prefix=name + ".", _default=default))
                continue
            rows.append({
                "name": name,
                "type": _type_name(hints[f.name]),
                "default": default,
                "doc": f.metadata.get("doc", ""),
                "min": f.metadata.get("min"),
                "max": f.metadata.get("max"),
                "choices": f.metadata.get("choices"),
            })
        return rows

    @classmethod
    def json_schema(cls, _default=None) -> dict:
        """JSON schema (draft 2020-12) of this config section, with descriptions and defaults."""
        props = {}
        hints = typing.get_type_hints(cls)
        instance = _default if _default is not None else cls()
        for f in fields(cls):
            default = getattr(instance, f.name)
            if "subconfig" in f.metadata:
                sub = f.metadata["subconfig"].json_schema(_default=default)
                sub["description"] = f.metadata["doc"]
                props[f.name] = sub
                continue
            if isinstance(default, tuple):
                default = list(default)
            prop = _json_type(hints[f.name])
            prop["description"] = f.metadata.get("doc", "")
            prop["default"] = default
            if f.metadata.get("min") is not None:
                prop["minimum"] = f.metadata["min"]
            if f.metadata.get("max") is not None:
                prop["maximum"] = f.metadata["max"]
            if f.metadata.get("choices"):
                prop["enum"] = list(f.metadata["choices"])
            props[f.name] = prop
        return {"type": "object", "properties": props, "additionalProperties": False,
                "description": (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""}


# ---------------------------------------------------------------- helpers
_SCALARS = {bool: "boolean", int: "integer", float: "number", str: "string"}


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (arg, *_) = typing.get_args(tp) or (Any,)
        return f"list[{getattr(arg, '__name__', str(arg))}]"
    if origin is typing.Union:
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _json_type(tp) -> dict:
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (arg, *_) = typing.get_args(tp) or (Any,)
        return {"type": "array", "items": _json_type(arg)}
    if origin is typing.Union:
        args = typing.get_args(tp)
        types = [_SCALARS.get(a, "null" if a is type(None) else "object") for a in args]
        return {"type": types}
    if tp is type(None):
        return {"type": "null"}
    return {"type": _SCALARS.get(tp, "object")}


def _check_value(name: str, value, tp, meta):
    if isinstance(value, str) and tp is not str:
        # Snakemake's --config hands nested values over as strings ('false', '3', '[1, 2]')
        import yaml

        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
        origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"option {name} must be a list, got {value!r}")
        (arg, *_) = typing.get_args(tp) or (Any,)
        return [_check_value(f"{name}[{i}]", v, arg, {}) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp in _SCALARS and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ConfigError(f"option {name} must be {tp.__name__}, got {value!r} ({type(value).__name__})")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"option {name} = {value!r} is not allowed; choose from {', '.join(map(repr, choices))}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo or hi is not None and value > hi:
        raise ConfigError(f"option {name} = {value!r} is outside [{lo}, {hi}]")
    return value
