"""Registered methods: one name -> one family config, with its options typed by the config's fields.

A family declares its options once, as the fields of a dataclass (`option(default, help)`), and
registers named presets of it (`register(Method("int4", QuantConfig(bits=4), ...))`). From those
fields come the option parser (`get_method("int4:window=16:block=64")`), `kvshrink methods` and
the CLI help. This module imports nothing heavy, so listing and checking methods and options
runs before torch or a model loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field, fields

from .errors import KvshrinkError


def option(default, help: str, choices: tuple = (), preset: bool = False):
    """A config field. preset: set by the method's name (bits of int4), not overridable by `:k=v`."""
    return field(default=default, metadata={"help": help, "choices": tuple(choices), "preset": preset})


def check_choice(name: str, value, choices) -> None:
    if choices and value not in choices:
        raise KvshrinkError(f"unknown {name} {value!r}; use one of {', '.join(map(str, choices))}")


def check_int(name: str, value, low: int = 0, none: bool = False) -> None:
    if none and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise KvshrinkError(f"{name} must be an integer >= {low}, got {value!r}")


class Config:
    """Base of the family configs: `family` names the builder (api.py); fields are the options."""

    family = ""
    can_save = False  # the family's caches can be written to a file (`cache.save`)
    calibrated = False  # the family measures a calibration on the corpus's last tokens (core/calibfile.py)

    def __post_init__(self):
        for f in fields(self):
            check_choice(f.name, getattr(self, f.name), f.metadata.get("choices", ()))
        self.check()

    def check(self) -> None:
        """Refuse impossible values (one line naming the problem)."""


@dataclass(frozen=True)
class Method:
    """A named preset of a family config. default: run by a plain `kvshrink bench`."""

    name: str
    config: Config
    description: str
    default: bool = False

    @property
    def family(self) -> str:
        return self.config.family


REGISTRY: dict[str, Method] = {}
_HINTS: list[tuple] = []  # (regex, function(match) -> message) for names that look like a family's


def register(method: Method) -> Method:
    if method.name in REGISTRY:
        raise ValueError(f"method {method.name!r} registered twice")
    REGISTRY[method.name] = method
    return method


def register_hint(pattern: str, explain) -> None:
    """A family's explanation for a name it does not have (int9: the bit widths that exist)."""
    _HINTS.append((re.compile(pattern), explain))


def tunable(config: Config) -> list:
    """The fields a name may override."""
    return [f for f in fields(config) if not f.metadata.get("preset")]


def _parse(f, text: str, method: str):
    kind = str(f.type).replace(" ", "")
    if "None" in kind and text.lower() == "none":
        return None
    base = kind.split("|")[0]
    try:
        if base == "bool":
            if text.lower() not in ("0", "1", "true", "false"):
                raise ValueError
            return text.lower() in ("1", "true")
        if base == "int":
            return int(text)
        if base == "float":
            return float(text)
    except ValueError:
        want = {"bool": "0 or 1", "int": "an integer", "float": "a number"}[base]
        raise KvshrinkError(f"option {f.name} of {method!r} needs {want}, got {text!r}") from None
    return text


def get_method(name: str) -> Method:
    """A registered method, or a variant with options: "int4:window=16:block=64"."""
    base, *opts = name.split(":")
    if base not in REGISTRY:
        for pattern, explain in _HINTS:
            m = pattern.fullmatch(base)
            if m:
                raise KvshrinkError(explain(m))
        close = difflib.get_close_matches(base, REGISTRY, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise KvshrinkError(f"unknown method {base!r}; {hint}`kvshrink methods` lists all {len(REGISTRY)}")
    method = REGISTRY[base]
    if not opts:
        return method
    allowed = {f.name: f for f in tunable(method.config)}
    overrides = {}
    for opt in opts:
        key, eq, value = opt.partition("=")
        if key not in allowed:
            fixed = {f.name for f in fields(method.config)} - set(allowed)
            why = " (set by the method's name)" if key in fixed else ""
            raise KvshrinkError(f"unknown option {key!r} for method {base!r}{why}; options: {', '.join(allowed)}")
        if not eq:
            raise KvshrinkError(f"option {key!r} of {base!r} needs a value: {key}=...")
        overrides[key] = _parse(allowed[key], value, base)
    config = dataclasses.replace(method.config, **overrides)
    return Method(name, config, f"{method.description} [{', '.join(opts)}]")


def method_names(family: str | None = None) -> list[str]:
    """Registered names, ours first; family="peer" for the peers only, "ours" for ours only."""
    names = list(REGISTRY)
    if family == "ours":
        return [n for n in names if REGISTRY[n].family != "peer"]
    if family is not None:
        return [n for n in names if REGISTRY[n].family == family]
    return names


def options_help(config: Config) -> list[str]:
    """One line per option of a config: name, default, choices, help."""
    out = []
    for f in tunable(config):
        choices = f.metadata.get("choices")
        what = "|".join(map(str, choices)) if choices else f"{getattr(config, f.name)!r}"
        out.append(f"{f.name}={what}: {f.metadata.get('help', '')}")
    return out
