"""The README runs: every command in its ```bash blocks and its Python snippet, as written, with the placeholder paths
replaced by the embedded MiniLM and a LoRA adapter made for it, in a temporary working folder. A README example
that fails or aborts fails here.

A `<!-- readme-test: ... -->` comment right before a block changes how it runs, and says why:
  skip: REASON        the block is not run (installs, the whole suite, a GPU); reported as a skip with the reason
  args --flag V ...   these flags are set on every `rewriter optimize` / `analyze` command of the block (CI time)
  samples=N           the Python snippet's `rewriter.optimize` calls default to samples=N (CI time)
Work is shared: one capture of MiniLM serves every command that loads it (checked unchanged after each use).
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = re.compile(r"^<!--\s*readme-test:\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")
PLACEHOLDERS = ("path/to/base", "path/to/hf-folder", "path/to/adapter")


@dataclass
class Block:
    lang: str
    line: int            # 1-based line of the opening fence
    text: str
    marker: str | None

    @property
    def id(self) -> str:
        return f"{self.lang}-line{self.line}"


def readme_blocks() -> list[Block]:
    lines = README.read_text(encoding="utf-8").splitlines()
    blocks, marker, i = [], None, 0
    while i < len(lines):
        m, f = MARKER.match(lines[i]), FENCE.match(lines[i])
        if m:
            marker = m.group(1)
        elif f:
            start, body = i, []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            blocks.append(Block(f.group(1), start + 1, "\n".join(body), marker))
            marker = None
        elif lines[i].strip():
            marker = None        # a marker applies to the block right after it (blank lines allowed)
        i += 1
    return blocks


def shell_commands(text: str) -> list[list[str]]:
    """The commands of a bash block: comments dropped, `\\` continuations joined, `&&` chains split."""
    joined = re.sub(r"\\\n", " ", text)
    commands = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        cmd: list[str] = []
        for w in words + ["&&"]:
            if w == "&&":
                if cmd:
                    commands.append(cmd)
                cmd = []
            else:
                cmd.append(w)
    return commands


BLOCKS = [b for b in readme_blocks() if b.lang in ("bash", "python")]


def test_readme_blocks_are_all_covered():
    """The extraction finds the README's examples (so the tests below cannot pass by finding nothing), every
    `rewriter` line outside bash/python blocks is the synopsis (```text), and every skip names its reason."""
    all_blocks = readme_blocks()
    commands = [" ".join(c) for b in BLOCKS if b.lang == "bash" for c in shell_commands(b.text)]
    for expected in ("rewriter optimize --recipe recipe.yaml -o out/perf",
                     "rewriter optimize path/to/base --adapter path/to/adapter -o out/merged",
                     "rewriter optimize --pass scatterbrain:density=0.1,features=32 --seq-len 512 -o out/minilm --force"):
        assert expected in commands, commands
    assert sum(b.lang == "python" for b in BLOCKS) >= 1
    for b in all_blocks:
        if b.lang not in ("bash", "python") and re.search(r"^rewriter ", b.text, re.M):
            assert b.lang == "text" and "[" in b.text, f"README line {b.line}: commands belong in a ```bash block"
        if b.marker and b.marker.startswith("skip"):
            assert len(b.marker) > len("skip: ") + 5, f"README line {b.line}: a skip says why"
    for b in BLOCKS:     # a non-rewriter command runs only in a block marked skip
        if b.lang == "bash" and not (b.marker or "").startswith("skip"):
            for c in shell_commands(b.text):
                assert c[0] == "rewriter", f"README line {b.line}: `{' '.join(c)}` is not run by this test; " \
                                           "mark the block with <!-- readme-test: skip: REASON -->"


@pytest.fixture(scope="module")
def minilm_adapter(minilm_dir, tmp_path_factory):
    from test_lora_merge import make_adapter
    return make_adapter(minilm_dir, tmp_path_factory.mktemp("readme") / "adapter")


@pytest.fixture(scope="module")
def shared_capture(minilm_dir):
    """rewriter.api.load_program, capturing each HF folder once for the module. The program is checked unchanged
    (a float64 checksum of its weights) each time it is handed out again."""
    import rewriter.api as api
    real = api.load_program
    cache: dict[str, tuple] = {}

    def checksum(program) -> float:
        return float(sum(t.double().abs().sum() for t in program.ep.state_dict.values()))

    def load_program(src, **kwargs):
        key = str(Path(src).resolve()) if isinstance(src, (str, Path)) else None
        if key is None or kwargs or api.is_rewriter_output(Path(src)):
            return real(src, **kwargs)
        if key not in cache:
            program = real(src)
            cache[key] = (program, checksum(program))
        program, total = cache[key]
        assert checksum(program) == total, f"a README command changed the shared capture of {src}"
        return program
    return load_program


def _substitute(text: str, minilm_dir: Path, adapter: Path) -> str:
    return (text.replace("path/to/base", str(minilm_dir)).replace("path/to/hf-folder", str(minilm_dir))
            .replace("path/to/adapter", str(adapter)))


def _with_args(cmd: list[str], extra: list[str]) -> list[str]:
    """Set `--flag value` pairs on a rewriter optimize / analyze command (replace the value when present)."""
    if cmd[:2] not in (["rewriter", "optimize"], ["rewriter", "analyze"]):
        return cmd
    cmd = list(cmd)
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in cmd:
            cmd[cmd.index(flag) + 1] = value
        else:
            cmd += [flag, value]
    return cmd


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block(block: Block, minilm_dir, minilm_adapter, shared_capture, tmp_path, monkeypatch):
    marker = block.marker or ""
    if marker.startswith("skip"):
        pytest.skip(f"README line {block.line}: {marker}")
    import rewriter
    import rewriter.api as api
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(api, "load_program", shared_capture)
    text = _substitute(block.text, minilm_dir, minilm_adapter)
    assert not any(p in text for p in PLACEHOLDERS)
    if block.lang == "python":
        m = re.match(r"samples=(\d+)", marker)
        if m:
            real = rewriter.optimize

            def optimize(*args, **kwargs):
                kwargs.setdefault("samples", int(m.group(1)))
                return real(*args, **kwargs)
            monkeypatch.setattr(rewriter, "optimize", optimize)
        exec(compile(text, f"README.md:{block.line}", "exec"), {"__name__": "readme"})
        return
    from typer.testing import CliRunner
    from rewriter.cli import app
    extra = shlex.split(marker[len("args"):].split("(")[0]) if marker.startswith("args") else []
    runner = CliRunner()
    ran = 0
    for cmd in shell_commands(text):
        assert cmd[0] == "rewriter", cmd
        cmd = _with_args(cmd, extra)
        redirect = None
        if ">" in cmd:
            redirect = Path(cmd[cmd.index(">") + 1])
            cmd = cmd[:cmd.index(">")]
        result = runner.invoke(app, cmd[1:])
        assert result.exit_code == 0, f"README line {block.line}: `{' '.join(cmd)}` failed:\n{result.output}"
        if redirect is not None:
            redirect.write_text(result.stdout)
        ran += 1
    assert ran, f"README line {block.line}: no command found"
