"""Loading: sharded safetensors, a missing shard, PEFT adapter folders given as SRC, nn.Modules."""
import pytest
import torch

import rewriter
from rewriter import RewriterError
from rewriter.load import load

from conftest import model_inputs, tiny_model


def test_sharded_checkpoint_loads_and_matches(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="40KB", safe_serialization=True)
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    program = rewriter.load_program(tmp_path / "sharded")
    inputs = model_inputs("llama", 2, 13)
    with torch.no_grad():
        ref = model(**inputs).logits
    torch.testing.assert_close(program.run(**inputs)[0], ref, atol=1e-5, rtol=1e-5)
    shards[-1].unlink()
    with pytest.raises(RewriterError, match="missing"):
        load(tmp_path / "sharded")


def test_adapter_folder_as_src_points_to_base(tiny_folders, tmp_path):
    from test_lora_merge import make_adapter
    ad = make_adapter(tiny_folders["bert"], tmp_path / "ad")
    with pytest.raises(RewriterError, match="--adapter"):
        load(ad)


def test_module_through_python_api():
    model = tiny_model("vit")
    program = rewriter.load_program(model)
    inputs = model_inputs("vit", 3, 0)
    with torch.no_grad():
        torch.testing.assert_close(program.run(**inputs)[0], model(**inputs).last_hidden_state, atol=1e-5, rtol=1e-5)
