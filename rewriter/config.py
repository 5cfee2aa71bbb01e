"""Typed pass configs: dataclasses read from dicts (recipes, CLI flags) with one-line errors."""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import RewriterError


@dataclass
class PassConfig:
    """Fields every pass shares: which sites it acts on."""
    include: list[str] = field(default_factory=list)   # module-path globs, or "re:<regex>"
    exclude: list[str] = field(default_factory=list)
    layers: str | None = None                          # "0-3", "1,4", "6-"

    def validate(self) -> None:
        """Subclasses check ranges; raise ValueError with what is allowed."""

    def site_filter(self):
        from .sites import SiteFilter
        return SiteFilter(list(self.include), list(self.exclude), self.layers)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ValueError(f"{where}: {value!r} fits none of {tp}")
    if origin is list:
        (item,) = args or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(";") if v] if ";" in value else [value]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item, where) for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())
                                           or (isinstance(value, str) and value.lstrip("-").isdigit())):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def config_from_dict(cls: type[PassConfig], data: dict, pass_name: str) -> PassConfig:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise RewriterError(f"pass '{pass_name}' has no config key {', '.join(repr(k) for k in unknown)}",
                            f"valid keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in data.items():
        try:
            kwargs[k] = _coerce(v, hints[k], f"{pass_name}.{k}")
        except ValueError as e:
            raise RewriterError(str(e)) from None
    try:
        cfg = cls(**kwargs)
        cfg.validate()
    except (TypeError, ValueError) as e:
        raise RewriterError(f"pass '{pass_name}': {e}") from None
    return cfg


def parse_scalar(text: str) -> Any:
    """CLI values: YAML scalars (0.1 -> float, true -> bool); [a, b(x=1,y=2)] -> a list split at top-level commas
    (by hand: globs like *mlp* and labels with parentheses are not YAML)."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        return [parse_scalar(t) for t in split_top_level(text[1:-1])]
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (int, float, bool, str)) or value is None else text


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on sep outside brackets: 'a=1,b=[x,y]' -> ['a=1', 'b=[x,y]']."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if cur:
        parts.append("".join(cur))
    return [p for p in (s.strip() for s in parts) if p]


def describe_fields(cls: type[PassConfig]) -> list[dict]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        tp = hints[f.name]
        tname = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
        out.append({"name": f.name, "type": tname,
                    "default": default, "help": f.metadata.get("help", "")})
    return out
