"""What rewriter trusts and what it refuses: the .pt2 pickle check, SRC/OUT rules, finiteness, YAML limits.

Everything here raises RewriterError (one line, exit 2 in the CLI). Nothing here imports a pass.
"""
from __future__ import annotations

import io
import re
import json
import math
import os
import zipfile
from pathlib import Path
from typing import Iterable

import torch

from .errors import RewriterError

META_FILE = "rewriter.json"

# ---------------------------------------------------------------------------------------------------------------
# .pt2 archives
#
# torch.export.save writes a zip: the graph as JSON (models/<name>.json), weights and constants as raw bytes
# described by JSON configs (data/weights/<name>_weights_config.json, data/constants/<name>_constants_config.json),
# and pickles in a few places: the example inputs (data/sample_inputs/<name>.pt, torch.save), legacy weight or
# constant files (data/weights/<name>.pt), weights/constants marked "use_pickle" (tensor subclasses) and custom or
# opaque objects (custom_obj_*, opaque_obj_*). torch.export.load unpickles the last two kinds without weights_only
# and falls back to weights_only=False for the first two. So before torch sees the archive:
#   - anything torch would unpickle unrestricted (use_pickle, custom_obj_*, opaque_obj_*) is refused outright;
#   - every other pickle must load with torch.load(weights_only=True), the restricted unpickler whose allow-list is
#     plain tensors and containers; then torch's own weights_only=True attempt on the same bytes succeeds and its
#     unrestricted fallback never runs;
#   - the archive is read once into memory and torch.export.load is given those bytes, so what was checked is what
#     is loaded; duplicate member names (which two zip readers may resolve differently) are refused.


def _refuse(path: Path | str, member: str, why: str) -> RewriterError:
    return RewriterError(f"refusing {path}: member {member} {why}",
                         "rewriter loads only .pt2 files whose pickles hold plain tensors; re-create it with "
                         "`rewriter optimize` from the HF folder")


def _restricted_load(data: bytes, path, member: str) -> None:
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "GLOBAL" in ln or "WeightsUnpickler" in ln),
                   lines[0] if lines else type(e).__name__)
        why = why.replace("WeightsUnpickler error: ", "").replace("Trying to load unsupported ", "")
        raise _refuse(path, member, f"is not a plain-tensor pickle ({why[:120]})") from None


# torch.export.load's pre-2.8 format hands these members to torch.load (unrestricted on fallback), .json ones too
LEGACY_PICKLED = ("serialized_state_dict.pt", "serialized_constants.pt", "serialized_example_inputs.pt",
                  "serialized_state_dict.json", "serialized_constants.json")
PICKLE_SUFFIXES = (".pt", ".pkl", ".pth", ".bin", ".pickle")


def _is_json(data: bytes) -> bool:
    try:
        return isinstance(json.loads(data), (dict, list))
    except (ValueError, UnicodeDecodeError):
        return False


def check_pt2_bytes(data: bytes, path: Path | str = "model.pt2") -> None:
    """Refuse an archive that would make torch.export.load unpickle anything but plain tensors."""
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
        infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise RewriterError(f"{path} is not a .pt2 archive: {e}", "re-create it with `rewriter optimize`") from None
    names = [i.filename for i in infos]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise _refuse(path, dupes[0], "appears more than once in the zip")
    total = sum(i.file_size for i in infos)
    if total > 64 * len(data) + (1 << 30):
        raise _refuse(path, infos[0].filename if infos else "?", "expands far beyond the archive size")
    raw: set[str] = set()    # members torch reads as raw tensor bytes (never unpickled)
    configs = {n for n in names if n.endswith(("_weights_config.json", "_constants_config.json"))}
    try:
        for name in sorted(configs):
            folder = name.rsplit("/", 1)[0]
            try:
                config = json.loads(z.read(name)).get("config", {})
            except (ValueError, AttributeError):
                raise _refuse(path, name, "is not a valid JSON payload config") from None
            if not isinstance(config, dict):
                raise _refuse(path, name, "is not a valid JSON payload config")
            for fqn, meta in config.items():
                if not isinstance(meta, dict):
                    raise _refuse(path, name, f"has a malformed entry for {fqn}")
                member = f"{folder}/{meta.get('path_name', '?')}"
                if meta.get("use_pickle"):
                    raise _refuse(path, member, f"({fqn}) is marked as pickled, which torch unpickles without "
                                                "restriction")
                pname = str(meta.get("path_name", ""))
                if pname.startswith(("custom_obj", "opaque_obj")) or "/" in pname or ".." in pname:
                    raise _refuse(path, member, f"({fqn}) is a custom Python object, which torch unpickles without "
                                                "restriction")
                raw.add(member)
        for info in infos:
            name = info.filename
            if name in raw or info.is_dir():
                continue
            base = name.rsplit("/", 1)[-1]
            blob = z.read(name)
            if name in configs:
                continue   # parsed above as JSON
            if (base in LEGACY_PICKLED or name.endswith(PICKLE_SUFFIXES) or "/sample_inputs/" in f"/{name}"
                    or any(f"/{d}/" in f"/{name}" for d in ("data/weights", "data/constants"))
                    or (blob[:4] == b"PK\x03\x04" or blob[:1] == b"\x80") and not _is_json(blob)):
                _restricted_load(blob, path, name)
    except RewriterError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise RewriterError(f"{path} is a corrupt .pt2 archive: {str(e).splitlines()[0][:160]}") from None


def load_pt2(path: Path):
    """torch.export.load of a checked archive (the bytes checked are the bytes loaded)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise RewriterError(f"cannot read {path}: {e.strerror}") from None
    check_pt2_bytes(data, path)
    _check_known_ops(data, path)
    return torch.export.load(io.BytesIO(data))


_REWRITER_OP = re.compile(rb"torch\.ops\.rewriter\.([A-Za-z_][A-Za-z0-9_]*)\.")


def _check_known_ops(data: bytes, path) -> None:
    """Name the operator a program needs that this rewriter does not define (torch.export.load would print a
    deserialisation traceback instead). Programs written before the ops took their pass names (rewriter::window,
    was rewriter::window_attention) are the common case."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        names = {m.decode() for info in z.infolist() if info.filename.endswith(".json")
                 for m in _REWRITER_OP.findall(z.read(info))}
    missing = sorted(n for n in names if not hasattr(torch.ops.rewriter, n))
    if missing:
        old = [n for n in missing if n.endswith("_attention")]
        hint = (f"; it was written by an earlier rewriter, whose attention ops were named <method>_attention (now "
                f"rewriter::{old[0][:-len('_attention')]}): run `rewriter optimize` on the original checkpoint again"
                if old else "")
        raise RewriterError(f"{path} uses the operator rewriter::{missing[0]}, which this rewriter does not "
                            f"define{hint}")


# ---------------------------------------------------------------------------------------------------------------
# SRC and OUT


def resolve(p: str | Path) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.path.expanduser(str(p)))))


def _within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_src_out(srcs: Iterable[str | Path | None], out: str | Path) -> None:
    """OUT may not be, contain, or lie inside any input (symlinks resolved)."""
    o = resolve(out)
    for s in srcs:
        if s is None or not isinstance(s, (str, os.PathLike)):
            continue
        r = resolve(s)
        if _within(o, r) or _within(r, o):
            rel = "is" if o == r else ("lies inside" if _within(o, r) else "contains")
            raise RewriterError(f"output {out} {rel} the input {s}",
                                "choose an output folder outside the input (and not containing it)")


def is_previous_output(folder: Path) -> bool:
    """A folder rewriter wrote: rewriter.json with its format marker, plus model.pt2 or analysis.json."""
    meta = folder / META_FILE
    if meta.is_file():
        try:
            data = json.loads(meta.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and data.get("format") == 1 and "input_names" in data
    if (folder / "analysis.json").is_file():   # `rewriter analyze -o` output
        names = {p.name for p in folder.iterdir()}
        return all(n == "analysis.json" or n.endswith(".png") for n in names)
    return False


def check_force(out: Path, force: bool) -> None:
    """--force replaces only an empty folder or a previous rewriter output."""
    if out.is_symlink() and not out.exists():
        raise RewriterError(f"output {out} is a dangling symlink", "remove it or choose another folder")
    if out.exists() and not out.is_dir():
        raise RewriterError(f"output {out} exists and is not a folder")
    if not out.exists():
        return
    try:
        empty = not any(out.iterdir())
    except OSError as e:
        raise RewriterError(f"cannot read output folder {out}: {e.strerror}") from None
    if empty:
        return
    if not force:
        raise RewriterError(f"output folder {out} is not empty", "pass --force to replace a previous rewriter output")
    if not is_previous_output(out):
        raise RewriterError(f"output folder {out} is not empty and is not a rewriter output; --force replaces only "
                            "an empty folder or a previous rewriter output", "choose a new output folder")


# ---------------------------------------------------------------------------------------------------------------
# Values


def check_finite_tensors(tensors: Iterable[tuple[str, torch.Tensor]], where: str) -> None:
    for name, t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise RewriterError(f"{where}: tensor {name} holds {bad} NaN/Inf value(s)",
                                "the checkpoint is broken; re-create or re-download it")


def check_number(name: str, value, *, minimum: float | None = None, maximum: float | None = None,
                 integer: bool = False, exclusive_min: bool = False) -> None:
    """A CLI/recipe number: finite, and within [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RewriterError(f"{name} must be a number; got {value!r}")
    if not math.isfinite(value):
        raise RewriterError(f"{name} must be a finite number; got {value!r}")
    if integer and float(value) != int(value):
        raise RewriterError(f"{name} must be an integer; got {value!r}")
    if minimum is not None and (value <= minimum if exclusive_min else value < minimum):
        raise RewriterError(f"{name} must be {'>' if exclusive_min else '>='} {minimum:g}; got {value!r}")
    if maximum is not None and value > maximum:
        raise RewriterError(f"{name} must be <= {maximum:g}; got {value!r}")


# ---------------------------------------------------------------------------------------------------------------
# YAML

MAX_YAML_BYTES = 1 << 20
MAX_YAML_DEPTH = 32


def safe_yaml_load(text: str, where: str):
    """yaml.safe_load with aliases refused (no alias bombs) and a bounded size and nesting depth."""
    import yaml

    if len(text) > MAX_YAML_BYTES:
        raise RewriterError(f"{where} is larger than {MAX_YAML_BYTES // 1024} KiB")

    class _Loader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                ev = self.peek_event()
                raise RewriterError(f"{where} uses a YAML alias (*{ev.anchor}) at line {ev.start_mark.line + 1}",
                                    "write the value out; rewriter does not expand YAML aliases")
            self._depth = getattr(self, "_depth", 0) + 1
            try:
                if self._depth > MAX_YAML_DEPTH:
                    raise RewriterError(f"{where} is nested deeper than {MAX_YAML_DEPTH} levels")
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

    try:
        return yaml.load(text, Loader=_Loader)   # noqa: S506  (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise RewriterError(f"{where} is not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise RewriterError(f"{where} is nested too deeply") from None
