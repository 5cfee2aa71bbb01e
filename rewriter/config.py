"""Typed pass configs: dataclasses read from dicts (recipes, CLI flags) with one-line errors."""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any


from .errors import RewriterError
from .program import max_length


@dataclass
class PassConfig:
    """Fields every pass shares: which sites it acts on."""
    include: list[str] = field(default_factory=list)   # module-path globs, or "re:<regex>"
    exclude: list[str] = field(default_factory=list)
    layers: str | None = None                          # "0-3", "1,4", "6-"
    allow_empty: bool = False                          # selecting no site is not an error

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
        out = int(value)
        if abs(out) > MAX_INT:
            raise ValueError(f"{where}: {value!r} is out of range (at most {MAX_INT:,})")
        return out
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(out):
            raise ValueError(f"{where}: expected a finite number, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


MAX_INT = 1 << 31
MAX_LAYER = 10_000
_LAYER_PART = re.compile(r"^\s*(\d+)\s*(-\s*(\d*)\s*)?$")


def check_site_fields(cfg: PassConfig, pass_name: str) -> None:
    """include/exclude regexes compile, layers is a list of ranges ("0-3", "1,4", "6-") of layer numbers."""
    for key in ("include", "exclude"):
        for pattern in getattr(cfg, key, None) or []:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as e:
                    raise RewriterError(f"pass '{pass_name}': {key} {pattern!r} is not a valid regex ({e})") from None
    layers = getattr(cfg, "layers", None)
    if layers is not None:
        for part in str(layers).split(","):
            if not part.strip():
                continue
            m = _LAYER_PART.match(part)
            if not m or int(m.group(1)) > MAX_LAYER or (m.group(3) and int(m.group(3)) > MAX_LAYER):
                raise RewriterError(f"pass '{pass_name}': layers {layers!r} is not a layer range",
                                    f'write e.g. "0-3", "1,4" or "6-" (layer numbers up to {MAX_LAYER})')
            if m.group(3) and int(m.group(3)) < int(m.group(1)):
                raise RewriterError(f"pass '{pass_name}': layers range {part.strip()!r} is empty")


# Size-like fields, checked against the model before any pass runs (generic: by field name, for every pass).
POSITION_FIELDS = ("window", "stride", "sinks", "bucket_size", "block", "n_obs", "sink_blocks", "local_blocks")
FEATURE_FIELDS = ("features",)
RANK_FIELDS = ("rank", "residual_rank", "rope_dims")
COUNT_FIELDS = {"n_hashes": 64, "iters": 1000}


def model_dims(config: dict) -> dict:
    """head_dim, hidden and max_positions of an HF config dict (None where unknown)."""
    def first(*keys):
        for k in keys:
            v = config.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return None
    hidden = first("hidden_size", "n_embd", "d_model", "dim")
    heads = first("num_attention_heads", "n_head", "num_heads")
    head_dim = first("head_dim") or (hidden // heads if hidden and heads else None)
    return {"hidden": hidden, "head_dim": head_dim, "intermediate": first("intermediate_size", "n_inner", "ffn_dim"),
            "max_positions": max_length(config)}


def check_bounds(cfg: PassConfig, pass_name: str, config: dict) -> None:
    """Bound size-like config values by the model: features by the head dim, ranks by the widest linear, windows and
    strides by the positions the model takes; every such value >= 0."""
    dims = model_dims(config or {})
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}

    def fail(key, value, limit, what):
        raise RewriterError(f"pass '{pass_name}': {key}={value} exceeds {limit} ({what})", f"use {key} <= {limit}")

    for key, value in cfg.to_dict().items():
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        if key in POSITION_FIELDS + FEATURE_FIELDS + RANK_FIELDS + tuple(COUNT_FIELDS) and value < 0:
            raise RewriterError(f"pass '{pass_name}': {key} must be >= 0; got {value}")
        default = defaults.get(key)
        default = default if isinstance(default, int) else 0
        if key in FEATURE_FIELDS and dims["head_dim"]:
            limit = max(1024, 16 * dims["head_dim"], default)
            if value > limit:
                fail(key, value, limit, f"the larger of 1024 and 16 x the head dim {dims['head_dim']}")
        elif key in RANK_FIELDS and dims["hidden"]:
            limit = max(2 * dims["hidden"], dims["intermediate"] or 0, default)
            if value > limit:
                fail(key, value, limit, "the widest weight of the model")
        elif key in POSITION_FIELDS and dims["max_positions"]:
            limit = max(dims["max_positions"], default)
            if value > limit:
                fail(key, value, limit, "the positions the model takes")
        elif key in COUNT_FIELDS and value > COUNT_FIELDS[key]:
            fail(key, value, COUNT_FIELDS[key], "the allowed count")


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
    except (TypeError, ValueError, OverflowError) as e:
        raise RewriterError(f"pass '{pass_name}': {e}") from None
    check_site_fields(cfg, pass_name)
    return cfg


def parse_scalar(text: str) -> Any:
    """CLI values: YAML scalars (0.1 -> float, true -> bool); [a, b(x=1,y=2)] -> a list split at top-level commas
    (by hand: globs like *mlp* and labels with parentheses are not YAML)."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        return [parse_scalar(t) for t in split_top_level(text[1:-1])]
    from .errors import RewriterError as _E
    from .safety import safe_yaml_load
    try:
        value = safe_yaml_load(text, "a --pass value")
    except _E:
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
