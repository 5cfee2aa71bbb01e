"""A streamed output read back: the model runs block by block, each block's graph bound to its weights from the
shards only while it runs (so a model larger than memory runs too, one block resident at a time)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import RewriterError
from .io import LazyCheckpoint
from .run import DESCRIPTION, FORMAT, VOCAB_CHUNK, embed, stored_name


def is_streamed_output(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / DESCRIPTION).is_file()


class StreamedModel:
    """`model(input_ids=..., attention_mask=...)` -> (logits,), block by block on `device`."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 keep_blocks: bool = False):
        self.folder = Path(folder)
        try:
            self.description = json.loads((self.folder / DESCRIPTION).read_text())
        except (OSError, ValueError) as e:
            raise RewriterError(f"{self.folder / DESCRIPTION} cannot be read: {e}") from None
        if self.description.get("format") != FORMAT:
            raise RewriterError(f"{self.folder} is a streamed output of format {self.description.get('format')!r}; "
                                f"this rewriter reads {FORMAT}")
        self.ckpt = LazyCheckpoint(self.folder)
        self.device, self.dtype = torch.device(device), dtype
        self.keep_blocks = keep_blocks
        self._blocks: dict[int, nn.Module] = {}
        import transformers
        config = transformers.AutoConfig.from_pretrained(str(self.folder))
        with torch.device("meta"):
            norm = transformers.AutoModelForCausalLM.from_config(config).model.norm
        self.norm = norm.to_empty(device=self.device)
        self.norm.load_state_dict(self.ckpt.block(self.description["norm"], dtype, self.device), assign=True)
        self.meta = self.description.get("meta", {})

    def __len__(self) -> int:
        return int(self.description["num_layers"])

    def block(self, i: int) -> nn.Module:
        """Block i's rewritten graph with its weights bound from the shards."""
        if i in self._blocks:
            return self._blocks[i]
        from .. import attention, linear  # noqa: F401  (the ops must exist before the graph is read)
        from ..safety import load_pt2
        ep = load_pt2(self.folder / self.description["blocks"][i])
        bound = {}
        for key, t in ep.state_dict.items():
            value = self.ckpt.tensor(stored_name(i, key), device=self.device)
            if value.shape != t.shape:
                raise RewriterError(f"{self.folder}: block {i} tensor {key} has shape {tuple(value.shape)} in the "
                                    f"shards, {tuple(t.shape)} in its graph")
            value = value.to(self.dtype) if value.is_floating_point() else value
            bound[key] = nn.Parameter(value, requires_grad=False) if isinstance(t, nn.Parameter) else value
        ep._state_dict = bound
        ep._constants = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in ep.constants.items()}
        from ..program import strip_metadata_asserts
        module = strip_metadata_asserts(ep.module())
        if self.keep_blocks:
            self._blocks[i] = module
        return module

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        input_ids = input_ids.to(self.device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)
        x = embed(self.ckpt, input_ids, self.dtype, self.device)
        for i in range(len(self)):
            x = self.block(i)(inputs_embeds=x, attention_mask=mask)[0]
        return self.norm(x)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor]:
        h = self.hidden_states(input_ids, attention_mask)
        head = self.description["head"]
        V = self.ckpt.info[head].shape[0]
        logits = [h @ self.ckpt.rows(head, s, min(V, s + VOCAB_CHUNK), self.dtype, self.device).T
                  for s in range(0, V, VOCAB_CHUNK)]
        return (torch.cat(logits, -1),)


def load_streamed(folder: str | Path, device: str | torch.device = "cpu", **kwargs) -> StreamedModel:
    return StreamedModel(folder, device, **kwargs)
