"""Recipes: a pass pipeline as a YAML (or TOML) file, the same thing the CLI flags build.

    rewriter: 1                  # recipe format
    rewriter_version: 0.1.0      # the version that wrote it (informational)
    max_error: 0.05              # optional
    calibration: {samples: 8, seq_len: 128, seed: 0}   # optional; file: path/to/text.txt; pack: true
    passes:
      - pass: lora-merge
        adapters: [path/to/adapter]
      - pass: window
        window: 128
        layers: "2-"

A written recipe (`--dry-run`) holds every config field, defaults included, and the calibration settings and seed,
so replaying it builds the same program even where a later version changes a default. Keys left out of a
hand-written recipe take their defaults.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .config import parse_scalar, split_top_level
from .errors import RewriterError
from .pipeline import MAX_PASSES, Pass, make_pass
from .safety import check_number, safe_yaml_load

RECIPE_KEYS = ("rewriter", "rewriter_version", "max_error", "calibration", "passes")
CALIBRATION_DEFAULTS = {"samples": 8, "seq_len": 128, "seed": 0}


def rewriter_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("rewriter")
    except PackageNotFoundError:
        return "unknown"


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data):
        return True


@dataclass
class Recipe:
    passes: list[Pass] = field(default_factory=list)
    max_error: float | None = None
    calibration: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d: dict = {"rewriter": 1, "rewriter_version": rewriter_version()}
        if self.max_error is not None:
            d["max_error"] = self.max_error
        d["calibration"] = {**CALIBRATION_DEFAULTS, **self.calibration}
        d["passes"] = [p.recipe_entry() for p in self.passes]
        return d

    def to_yaml(self) -> str:
        # no anchors/aliases even where a value is shared: recipes are read back with aliases refused
        return yaml.dump(self.to_dict(), Dumper=_NoAliasDumper, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict, where: str = "recipe") -> "Recipe":
        if not isinstance(data, dict):
            raise RewriterError(f"{where} must be a mapping with a 'passes' list")
        unknown = [k for k in data if k not in RECIPE_KEYS]
        if unknown:
            raise RewriterError(f"{where} has unknown key(s) {', '.join(unknown)}", f"valid keys: {', '.join(RECIPE_KEYS)}")
        entries = data.get("passes") or []
        if not isinstance(entries, list):
            raise RewriterError(f"{where}: 'passes' must be a list")
        if len(entries) > MAX_PASSES:
            raise RewriterError(f"{where} has {len(entries)} passes; at most {MAX_PASSES} per pipeline")
        passes = []
        for i, entry in enumerate(entries):
            if isinstance(entry, str):
                entry = {"pass": entry}
            if not isinstance(entry, dict) or "pass" not in entry:
                raise RewriterError(f"{where}: passes[{i}] needs a 'pass' name")
            options = {k: v for k, v in entry.items() if k != "pass"}
            passes.append(make_pass(str(entry["pass"]), options))
        max_error = data.get("max_error")
        if max_error is not None:
            check_number(f"{where}: max_error", max_error, minimum=0)
        calibration = data.get("calibration") or {}
        if not isinstance(calibration, dict):
            raise RewriterError(f"{where}: 'calibration' must be a mapping (samples, seq_len, seed, file); "
                                f"got {calibration!r}"[:200])
        bad = [k for k in calibration if k not in ("samples", "seq_len", "seed", "file", "pack")]
        if bad:
            raise RewriterError(f"{where}: unknown calibration key(s) {bad}",
                                "valid keys: samples, seq_len, seed, file, pack")
        for key in ("samples", "seq_len", "seed"):
            if key in calibration:
                check_number(f"{where}: calibration.{key}", calibration[key], integer=True,
                             minimum=0 if key == "seed" else 1)
        version = data.get("rewriter_version")
        if version is not None and not isinstance(version, str):
            raise RewriterError(f"{where}: rewriter_version must be a string; got {version!r}"[:200])
        if "pack" in calibration and not isinstance(calibration["pack"], bool):
            raise RewriterError(f"{where}: calibration.pack must be true or false; got {calibration['pack']!r}"[:200])
        if "file" in calibration and not isinstance(calibration["file"], str):
            raise RewriterError(f"{where}: calibration.file must be a path; got {calibration['file']!r}"[:200])
        return cls(passes, float(max_error) if max_error is not None else None, dict(calibration))

    @classmethod
    def from_file(cls, path: str | Path) -> "Recipe":
        p = Path(path)
        if not p.is_file():
            raise RewriterError(f"recipe file not found: {p}")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise RewriterError(f"recipe {p} is not UTF-8 text", "pass a YAML or TOML recipe") from None
        except OSError as e:
            raise RewriterError(f"cannot read recipe {p}: {e.strerror}") from None
        if "\x00" in text:
            raise RewriterError(f"recipe {p} is a binary file, not YAML or TOML")
        if p.suffix == ".toml":
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                raise RewriterError(f"recipe {p} is not valid TOML: {str(e).splitlines()[0]}") from None
            except RecursionError:
                raise RewriterError(f"recipe {p} is nested too deeply") from None
        else:
            data = safe_yaml_load(text, f"recipe {p}")
        return cls.from_dict(data, str(p))


def parse_pass_flag(spec: str) -> Pass:
    """'NAME' or 'NAME:key=val,key=val' (values are YAML scalars; lists as [a,b])."""
    name, _, rest = spec.partition(":")
    options = {}
    for item in split_top_level(rest):
        key, eq, value = item.partition("=")
        if not eq:
            raise RewriterError(f"--pass {spec}: '{item}' is not key=value")
        options[key.strip()] = parse_scalar(value.strip())
    return make_pass(name.strip(), options)
