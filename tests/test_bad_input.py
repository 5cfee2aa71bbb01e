"""The bad-input corpus (issue 22): what a hostile or careless user may hand rewriter.

Every case must end with exit code 2 and one error line on stderr (no traceback), write no OUT (and create none of
its parents), leave every input byte-for-byte unchanged, leave no staging folder, never create a payload's marker
file, and finish within a time limit. Add a case whenever a new input path appears.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from typer.testing import CliRunner

from rewriter.cli import app


CASE_SECONDS = 60
runner = CliRunner()


class Payload:
    """Unpickling this runs `touch marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def payload_bytes(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    return buf.getvalue()


def rezip(pt2: Path, replace: dict[str, Callable[[bytes], bytes]], extra: list[tuple[str, bytes]] = ()) -> None:
    """Rewrite members of a zip (members whose name ends with a key of `replace` are passed through its function)."""
    with zipfile.ZipFile(pt2) as z:
        items = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    with zipfile.ZipFile(pt2, "w", zipfile.ZIP_STORED) as z:
        for name, data in items:
            for suffix, fn in replace.items():
                if name.endswith(suffix):
                    data = fn(data)
            z.writestr(name, data)
        for name, data in extra:
            z.writestr(name, data)


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    if path.is_file():
        h.update(path.read_bytes())
        return h.hexdigest()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Shared, read-only material: built once, copied into each case's folder before it is damaged.


@pytest.fixture(scope="module")
def material(tmp_path_factory, tiny_folders):
    root = tmp_path_factory.mktemp("material")
    bert, llama = tiny_folders["bert"], tiny_folders["llama"]
    rw = root / "rw"
    r = runner.invoke(app, ["optimize", str(bert), "--pass", "window:window=8", "--seq-len", "16", "--samples", "2",
                            "-o", str(rw)])
    assert r.exit_code == 0, r.output
    from test_lora_merge import make_adapter
    adapter = make_adapter(bert, root / "adapter")
    return {"bert": bert, "llama": llama, "rw": rw, "adapter": adapter}


@dataclass
class Ctx:
    tmp: Path
    material: dict
    inputs: list[Path] = field(default_factory=list)    # hashed before and after
    markers: list[Path] = field(default_factory=list)   # a payload creates these if it runs

    def copy(self, name: str, as_name: str | None = None) -> Path:
        dst = self.tmp / (as_name or name)
        shutil.copytree(self.material[name], dst)
        self.inputs.append(dst)
        return dst

    def file(self, name: str, data: bytes | str) -> Path:
        p = self.tmp / name
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        self.inputs.append(p)
        return p

    def marker(self) -> Path:
        m = self.tmp / f"PWNED-{len(self.markers)}"
        self.markers.append(m)
        return m

    @property
    def out(self) -> Path:   # its parent does not exist: a failed run must not create it
        return self.tmp / "outparent" / "out"


def edit_safetensors(folder: Path, fn) -> None:
    from safetensors.torch import load_file, save_file
    sd = load_file(str(folder / "model.safetensors"))
    fn(sd)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    data = fn(data) or data
    path.write_text(json.dumps(data))


def query(sd):
    return next(k for k in sd if k.endswith("query.weight"))


OPT = ["--seq-len", "16", "--samples", "2"]


# Each case: ctx -> (argv, words the error line must contain).
def c_pt2_sample_inputs_payload(c: Ctx):
    rw = c.copy("rw")
    m = c.marker()
    rezip(rw / "model.pt2", {"sample_inputs/model.pt": lambda _: payload_bytes(m)})
    return ["inspect", rw, "--json"], ["refusing", "sample_inputs/model.pt", ".system"]


def c_pt2_weight_marked_pickled(c: Ctx):
    rw = c.copy("rw")
    m = c.marker()

    def config(b):
        d = json.loads(b)
        first = next(iter(d["config"]))
        d["config"][first]["use_pickle"] = True
        return json.dumps(d).encode()
    rezip(rw / "model.pt2", {"model_weights_config.json": config, "data/weights/weight_0": lambda _: payload_bytes(m)})
    return ["optimize", rw, "--pass", "window:window=4", *OPT, "-o", c.out], ["refusing", "weight_0", "pickled"]


def c_pt2_custom_object_constant(c: Ctx):
    rw = c.copy("rw")
    m = c.marker()

    def config(b):
        d = json.loads(b)
        d["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": False}
        return json.dumps(d).encode()
    import pickle
    rezip(rw / "model.pt2", {"model_constants_config.json": config},
          extra=[("model/data/constants/opaque_obj_0", pickle.dumps(Payload(m)))])
    return ["inspect", rw], ["refusing", "opaque_obj_0"]


def c_pt2_legacy_weights_pickle(c: Ctx):
    rw = c.copy("rw")
    m = c.marker()
    rezip(rw / "model.pt2", {}, extra=[("model/data/weights/model.pt", payload_bytes(m))])
    return ["inspect", rw], ["refusing", "data/weights/model.pt"]


def c_pt2_legacy_json_named_pickle(c: Ctx):
    import pickle
    rw = c.copy("rw")
    m = c.marker()   # torch's pre-2.8 reader hands serialized_state_dict.json to torch.load; protocol 0 has no magic
    rezip(rw / "model.pt2", {}, extra=[("serialized_state_dict.json", pickle.dumps(Payload(m), protocol=0))])
    return ["inspect", rw], ["refusing", "serialized_state_dict.json", ".system"]


def c_pt2_duplicate_member(c: Ctx):
    rw = c.copy("rw")
    m = c.marker()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rezip(rw / "model.pt2", {}, extra=[("model/data/sample_inputs/model.pt", payload_bytes(m))])
    return ["inspect", rw], ["refusing", "more than once"]


def c_pt2_not_a_zip(c: Ctx):
    rw = c.copy("rw")
    (rw / "model.pt2").write_bytes(b"not a zip at all" * 10)
    return ["inspect", rw], ["not a .pt2 archive"]


def c_pt2_meta_broken(c: Ctx):
    rw = c.copy("rw")
    edit_json(rw / "rewriter.json", lambda d: {k: v for k, v in d.items() if k != "input_names"})
    return ["inspect", rw], ["rewriter.json"]


def c_out_is_src_force(c: Ctx):
    q = c.copy("bert", "q")
    return ["optimize", q, "--pass", "window", "-o", q, "--force"], ["is the input"]


def c_out_contains_src_force(c: Ctx):
    q = c.tmp / "outer" / "q"
    shutil.copytree(c.material["bert"], q)
    c.inputs.append(c.tmp / "outer")
    return ["optimize", q, "--pass", "window", "-o", c.tmp / "outer", "--force"], ["contains the input"]


def c_out_inside_src(c: Ctx):
    q = c.copy("bert", "q")
    return ["optimize", q, "--pass", "window", "-o", q / "out"], ["lies inside the input"]


def c_out_symlink_to_src(c: Ctx):
    q = c.copy("bert", "q")
    (c.tmp / "link").symlink_to(q, target_is_directory=True)
    return ["optimize", q, "--pass", "window", "-o", c.tmp / "link", "--force"], ["is the input"]


def c_out_is_adapter(c: Ctx):
    ad = c.copy("adapter")
    return ["optimize", c.material["bert"], "--adapter", ad, "-o", ad, "--force"], ["is the input"]


def c_onnx_into_src(c: Ctx):
    q = c.copy("bert", "q")
    return ["export", q, "--onnx", q / "model.onnx"], ["lies inside the input"]


def c_force_on_foreign_folder(c: Ctx):
    other = c.tmp / "foreign"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    c.inputs.append(other)
    return ["optimize", c.material["bert"], "--pass", "window", *OPT, "-o", other, "--force"], \
        ["not a rewriter output"]


def c_out_under_a_file(c: Ctx):
    f = c.file("afile", "x")
    return ["optimize", c.material["bert"], "--pass", "window", "-o", f / "out"], ["not a folder"]


def c_out_under_proc(c: Ctx):
    if not Path("/proc").is_dir():
        pytest.skip("no /proc")
    return ["optimize", c.material["bert"], "--pass", "window", *OPT, "-o", "/proc/x/out"], ["cannot write"]


def c_out_dot_force(c: Ctx):
    work = c.copy("bert", "work")
    os.chdir(work)
    return ["optimize", work, "--pass", "window", "-o", ".", "--force"], ["is the input"]


def c_out_dot_force_foreign(c: Ctx):
    work = c.tmp / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    c.inputs.append(work)
    os.chdir(work)
    return ["optimize", c.material["bert"], "--pass", "window", *OPT, "-o", ".", "--force"], ["not a rewriter output"]


def c_missing_tensor(c: Ctx):
    q = c.copy("bert", "q")
    edit_safetensors(q, lambda sd: sd.pop(query(sd)))
    return ["optimize", q, "--pass", "window", "-o", c.out], ["lacks 1 tensor", "query.weight"]


def c_unused_tensor(c: Ctx):
    q = c.copy("bert", "q")
    edit_safetensors(q, lambda sd: sd.update({"stowaway.weight": torch.zeros(3)}))
    return ["optimize", q, "--pass", "window", "-o", c.out], ["does not use", "stowaway.weight",
                                                              "--allow-unused-weights"]


def c_int_dtype_same_size(c: Ctx):
    q = c.copy("bert", "q")
    edit_safetensors(q, lambda sd: sd.update({query(sd): sd[query(sd)].view(torch.int32)}))
    return ["inspect", q], ["stored as I32"]


def c_wrong_shape(c: Ctx):
    q = c.copy("bert", "q")
    edit_safetensors(q, lambda sd: sd.update({query(sd): torch.zeros(32, 64)}))
    return ["inspect", q], ["wrong shape", "(32, 64)"]


def c_architecture_for_other_model_type(c: Ctx):
    q = c.copy("llama", "q")
    edit_json(q / "config.json", lambda d: d.update(architectures=["BertModel"]))
    return ["inspect", q], ["BertModel", "model_type is 'llama'"]


def c_zero_layers(c: Ctx):
    q = c.copy("bert", "q")
    edit_json(q / "config.json", lambda d: d.update(num_hidden_layers=0))
    return ["inspect", q], ["0 layers"]


def c_nan_weight(c: Ctx):
    q = c.copy("bert", "q")
    edit_safetensors(q, lambda sd: sd[query(sd)].__setitem__((0, 0), float("nan")))
    return ["optimize", q, "--pass", "window", "-o", c.out], ["NaN/Inf", "query.weight"]


def c_inf_weight(c: Ctx):
    q = c.copy("bert", "q")
    edit_safetensors(q, lambda sd: sd[query(sd)].__setitem__((1, 1), float("inf")))
    return ["inspect", q], ["NaN/Inf"]


def c_bad_shard_index(c: Ctx):
    q = c.copy("bert", "q")
    (q / "model.safetensors.index.json").write_text("{not json")
    return ["inspect", q], ["model.safetensors.index.json", "not valid JSON"]


def c_shard_index_escapes_folder(c: Ctx):
    q = c.copy("bert", "q")
    (q / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../etc/x.safetensors"}}))
    return ["inspect", q], ["not a .safetensors file in"]


def c_pickled_model_bin(c: Ctx):
    q = c.copy("bert", "q")
    (q / "model.safetensors").unlink()
    m = c.marker()
    (q / "pytorch_model.bin").write_bytes(payload_bytes(m))
    return ["inspect", q], ["pickled Python object"]


def c_pickled_pt_file(c: Ctx):
    m = c.marker()
    f = c.file("model.pt", payload_bytes(m))
    return ["inspect", f], ["pickled Python object"]


def c_adapter_config_is_list(c: Ctx):
    ad = c.copy("adapter")
    (ad / "adapter_config.json").write_text("[1, 2]")
    return ["optimize", c.material["bert"], "--adapter", ad, *OPT, "-o", c.out], ["must be a JSON object"]


def c_adapter_alpha_string(c: Ctx):
    ad = c.copy("adapter")
    edit_json(ad / "adapter_config.json", lambda d: d.update(lora_alpha="x"))
    return ["optimize", c.material["bert"], "--adapter", ad, *OPT, "-o", c.out], ["lora_alpha"]


def c_adapter_nan_lora_b(c: Ctx):
    from safetensors.torch import load_file, save_file
    ad = c.copy("adapter")
    sd = load_file(str(ad / "adapter_model.safetensors"))
    k = next(k for k in sd if "lora_B" in k)
    sd[k][0, 0] = float("nan")
    save_file(sd, str(ad / "adapter_model.safetensors"))
    return ["optimize", c.material["bert"], "--adapter", ad, *OPT, "-o", c.out], ["adapter", "NaN/Inf"]


def c_adapter_pickled_bin(c: Ctx):
    ad = c.copy("adapter")
    (ad / "adapter_model.safetensors").unlink()
    m = c.marker()
    (ad / "adapter_model.bin").write_bytes(payload_bytes(m))
    return ["optimize", c.material["bert"], "--adapter", ad, *OPT, "-o", c.out], ["pickled Python object"]


def _recipe(c: Ctx, text: str | bytes, name: str = "r.yaml"):
    f = c.file(name, text)
    return ["optimize", c.material["bert"], "--recipe", f, "-o", c.out]


def c_recipe_alias_bomb(c: Ctx):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    text = "\n".join(lines) + "\npasses:\n  - pass: auto-attention\n    density: 0.5\n    plan: *a9\n"
    return _recipe(c, text) + ["--dry-run"], ["alias"]


def c_recipe_deep_nesting(c: Ctx):
    return _recipe(c, "passes: " + "[" * 5000 + "]" * 5000 + "\n"), ["nested"]


def c_recipe_python_tag(c: Ctx):
    m = c.marker()
    return _recipe(c, f"passes: !!python/object/apply:os.system ['touch {m}']\n"), ["not valid YAML"]


def c_recipe_seq_len_text(c: Ctx):
    return _recipe(c, "calibration: {seq_len: abc}\npasses: [window]\n"), ["calibration.seq_len", "number"]


def c_recipe_max_error_text(c: Ctx):
    return _recipe(c, "max_error: abc\npasses: [window]\n"), ["max_error", "number"]


def c_recipe_calibration_scalar(c: Ctx):
    return _recipe(c, "calibration: 5\npasses: [window]\n"), ["'calibration' must be a mapping"]


def c_recipe_negative_samples(c: Ctx):
    return _recipe(c, "calibration: {samples: -3}\npasses: [window]\n"), ["calibration.samples", ">= 1"]


def c_recipe_binary(c: Ctx):
    return _recipe(c, bytes(range(256)) * 4), ["recipe"]


def c_recipe_too_many_passes(c: Ctx):
    return _recipe(c, "passes:\n" + "  - window\n" * 65), ["at most 64"]


def c_flag_features_huge(c: Ctx):
    return ["optimize", c.material["bert"], "--pass", "performer:features=100000000", *OPT, "-o", c.out], \
        ["features=100000000", "exceeds"]


def c_flag_features_1e8(c: Ctx):
    return ["optimize", c.material["bert"], "--pass", "performer:features=1e8", *OPT, "-o", c.out], \
        ["features", "integer"]


def c_flag_rank_huge(c: Ctx):
    return ["optimize", c.material["bert"], "--pass", "lowrank:rank=1000000", *OPT, "-o", c.out], \
        ["rank=1000000", "exceeds"]


def c_flag_window_negative(c: Ctx):
    return ["optimize", c.material["bert"], "--pass", "window:window=-3", *OPT, "-o", c.out], ["window", ">= 0"]


def c_flag_density_nan(c: Ctx):
    return ["optimize", c.material["bert"], "--pass", "window:density=nan", "-o", c.out], ["finite"]


def c_flag_layers_text(c: Ctx):
    return ["optimize", c.material["bert"], "--pass", "window:layers=abc", "-o", c.out], ["not a layer range"]


def c_flag_layers_huge(c: Ctx):
    return ["optimize", c.material["bert"], "--pass", "window:layers=0-99999999999", "-o", c.out], \
        ["not a layer range"]


def c_flag_include_bad_regex(c: Ctx):
    return ["optimize", c.material["bert"], "--pass", "window:include=re:[", "-o", c.out], ["not a valid regex"]


def _flag(c: Ctx, *extra):
    return ["optimize", c.material["bert"], "--pass", "window", "-o", c.out, *extra]


def c_samples_zero(c: Ctx):
    return _flag(c, "--samples", "0"), ["--samples", ">= 1"]


def c_samples_negative(c: Ctx):
    return _flag(c, "--samples", "-1"), ["--samples"]


def c_samples_huge(c: Ctx):
    return _flag(c, "--samples", "100000000"), ["--samples", "<="]


def c_seq_len_zero(c: Ctx):
    return _flag(c, "--seq-len", "0"), ["--seq-len", ">= 1"]


def c_seq_len_negative(c: Ctx):
    return _flag(c, "--seq-len", "-5"), ["--seq-len"]


def c_max_error_nan(c: Ctx):
    return _flag(c, "--max-error", "nan"), ["--max-error", "finite"]


def c_max_error_negative(c: Ctx):
    return _flag(c, "--max-error", "-1"), ["--max-error", ">= 0"]


def c_calib_is_folder(c: Ctx):
    (c.tmp / "calibdir").mkdir()
    return _flag(c, "--calib", c.tmp / "calibdir"), ["is a folder"]


def c_calib_binary(c: Ctx):
    f = c.file("calib.txt", bytes(range(256)) * 64)
    return _flag(c, "--calib", f, *OPT), ["not UTF-8 text"]


def c_calib_without_tokenizer(c: Ctx):
    f = c.file("calib.txt", "Some real text.\n\nAnother passage.\n")
    return _flag(c, "--calib", f, *OPT), ["no tokenizer"]


def c_generate_negative_new_tokens(c: Ctx):
    return ["generate", c.material["llama"], "--prompt-ids", "1,2,3", "--max-new-tokens", "-3"], ["--max-new-tokens"]


def c_generate_max_len_two(c: Ctx):
    return ["generate", c.material["llama"], "--prompt-ids", "1,2,3", "--max-len", "2"], ["--max-len", ">= 3"]


def c_generate_prompt_id_float(c: Ctx):
    return ["generate", c.material["llama"], "--prompt-ids", "1e23"], ["--prompt-ids"]


def c_generate_prompt_id_huge(c: Ctx):
    return ["generate", c.material["llama"], "--prompt-ids", "100000000000000000000000"], ["not a token id"]


def c_generate_past_positions(c: Ctx):
    return ["generate", c.material["llama"], "--prompt-ids", "1,2", "--max-new-tokens", "500"], ["positions"]


def c_generate_output_decode_path_escapes(c: Ctx):
    rw = c.copy("rw")

    def tamper(d):
        d["config"]["model_type"] = "llama"
        d["decode"] = {"weights": "../../elsewhere", "kv_policy": {}}
    edit_json(rw / "rewriter.json", tamper)
    return ["generate", rw, "--prompt-ids", "1,2"], ["not a folder inside"]


def c_generate_nan_model(c: Ctx):
    q = c.copy("llama", "q")
    edit_safetensors(q, lambda sd: sd[next(iter(sd))].__setitem__(0, float("nan")))
    return ["generate", q, "--prompt-ids", "1,2,3", "--max-new-tokens", "4"], ["NaN/Inf"]


CASES = {name[2:]: fn for name, fn in sorted(globals().items()) if name.startswith("c_")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case, material, tmp_path, monkeypatch, capfd):
    c = Ctx(tmp=tmp_path / "case", material=material)
    c.tmp.mkdir()
    cwd = os.getcwd()
    monkeypatch.chdir(c.tmp)     # a case may chdir further; staging leftovers are looked for here too
    argv, needles = CASES[case](c)
    before = {p: tree_hash(p) for p in c.inputs}
    before_material = {k: tree_hash(Path(v)) for k, v in material.items()}
    t0 = time.perf_counter()
    r = runner.invoke(app, [str(a) for a in argv])
    seconds = time.perf_counter() - t0
    os.chdir(cwd)
    leaked = capfd.readouterr().err   # what bypassed the CLI's streams (library logging handlers, warnings)
    assert "Traceback" not in leaked and "LOAD REPORT" not in leaked, leaked
    stderr = r.stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [i for i, ln in enumerate(lines) if ln.startswith("error: ")]
    assert len(errors) == 1, stderr
    progress = lines[:errors[0]]    # only progress lines before it: "step ..." as it starts, ✓/✗ as it ends
    assert all(ln.endswith(" ...") or ln[:2] in ("✓ ", "✗ ") for ln in progress), stderr
    marks = [ln for ln in progress if ln[:2] in ("✓ ", "✗ ")]
    assert all(ln.startswith("✓ ") for ln in marks[:-1]), stderr    # a cross only on the step that failed
    lines = lines[errors[0]:]   # and nothing after it
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert r.exception is None or isinstance(r.exception, SystemExit), (r.output, r.exception)
    assert "Traceback" not in r.output, r.output
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for n in needles:
        assert str(n) in lines[0], lines[0]
    assert not c.out.exists() and not c.out.parent.exists(), "a failed run created OUT or its parent"
    for p, h in before.items():
        assert tree_hash(p) == h, f"input {p} changed"
    assert {k: tree_hash(Path(v)) for k, v in material.items()} == before_material
    for m in c.markers:
        assert not m.exists(), f"a payload ran: {m} exists"
    staging = [p for p in c.tmp.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name or "write-test" in p.name]
    assert not staging, staging
    assert seconds < CASE_SECONDS, f"{case} took {seconds:.1f}s"


def test_payload_builders_really_run_code(tmp_path):
    """The corpus is only as good as its payloads: unpickled without restriction, they do create the marker."""
    m = tmp_path / "PWNED"
    torch.load(io.BytesIO(payload_bytes(m)), weights_only=False)
    assert m.exists()


# ----------------------------------------------------------------------------------------------------------------
# What the CLI corpus cannot reach in-process.


def test_rewriter_outputs_still_load(material, tmp_path):
    """The check refuses payloads but not what rewriter itself writes (and the output has the user's mode)."""
    from rewriter.api import load_program
    rw = material["rw"]
    program = load_program(rw)
    assert program.input_names
    mode = (rw.stat().st_mode & 0o777)
    assert mode == 0o777 & ~_umask(), oct(mode)
    report = json.loads((rw / "report.json").read_text())
    assert report["passes"][0]["pass"] == "window"


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


def test_force_replaces_previous_output(material, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(material["rw"], out)
    (out / "stale.txt").write_text("old")
    r = runner.invoke(app, ["optimize", str(material["bert"]), "--pass", "window:window=4", *OPT,
                            "-o", str(out), "--force"])
    assert r.exit_code == 0, r.output
    assert not (out / "stale.txt").exists() and (out / "model.pt2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_allow_unused_weights_flag(material, tmp_path):
    """The explicit flag accepts (only) unused tensors; the same checkpoint fails without it (corpus case above)."""
    q = tmp_path / "q"
    shutil.copytree(material["bert"], q)
    edit_safetensors(q, lambda sd: sd.update({"stowaway.weight": torch.zeros(3)}))
    r = runner.invoke(app, ["optimize", str(q), "--pass", "window:window=4", *OPT, "-o", str(tmp_path / "out"),
                            "--allow-unused-weights"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "model.pt2").exists()


def test_symlinked_out_is_replaced_at_its_target(material, tmp_path):
    target = tmp_path / "real"
    shutil.copytree(material["rw"], target)
    (tmp_path / "link").symlink_to(target, target_is_directory=True)
    r = runner.invoke(app, ["optimize", str(material["bert"]), "--pass", "window:window=4", *OPT,
                            "-o", str(tmp_path / "link"), "--force"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "link").is_symlink() and (target / "model.pt2").exists()
    assert json.loads((target / "report.json").read_text())["passes"][0]["config"]["window"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]   # no .real.old-* / .tmp-* left


def test_staging_removed_on_signal(tmp_path):
    from rewriter.backends.torch_backend import staged_output
    from rewriter.cli.main import Stopped
    out = tmp_path / "a" / "out"
    with pytest.raises(Stopped):
        with staged_output(out, force=False) as tmp:
            (tmp / "model.pt2").write_bytes(b"partial")
            raise Stopped(signal.SIGTERM)
    assert not list(tmp_path.iterdir())


def test_report_json_is_valid_with_non_finite_numbers(tmp_path):
    from rewriter.report import write_json
    write_json({"final": {"relative_error": float("nan"), "max": float("inf"), "ok": 1.5}}, tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert data["final"] == {"relative_error": None, "max": None, "ok": 1.5}


def test_nan_output_after_a_pass_is_an_error(tiny_folders):
    from rewriter.api import load_program
    from rewriter.calibration import calibration_inputs
    from rewriter.errors import RewriterError
    from rewriter.pipeline import Pass, PassResult, Pipeline, SiteChange

    class Poison(Pass):
        name = "poison-test"
        weight_only = True

        def run(self, gm, ctx):
            p = next(p for n, p in gm.named_parameters() if n.endswith("query.weight"))
            p.data.fill_(float("nan"))
            return PassResult(changes=[SiteChange("q", "linear")])

    program = load_program(tiny_folders["bert"])
    inputs, desc = calibration_inputs(program, samples=2, seq_len=16)
    with pytest.raises(RewriterError, match="NaN/Inf"):
        Pipeline([Poison()]).run(program, inputs, desc)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_says_nothing_was_written(sig, tiny_folders, tmp_path):
    """A real process: SIGTERM / SIGINT mid-run exits 128 + signal with one line, no OUT, no staging folder."""
    out = tmp_path / "o" / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "rewriter", "optimize", str(tiny_folders["bert"]), "--pass",
                             "window:window=8", *OPT, "-o", str(out)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    seen = ""
    while time.time() < deadline:   # wait until the run is under way (its first progress line)
        line = proc.stderr.readline()
        seen += line
        if "loading and capturing" in line or not line:
            break
    proc.send_signal(sig)
    _, rest = proc.communicate(timeout=120)
    seen += rest
    assert proc.returncode == 128 + sig, seen
    assert "nothing was written" in seen and "Traceback" not in seen, seen
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.rglob(".*tmp-*")]
