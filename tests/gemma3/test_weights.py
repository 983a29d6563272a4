import json

import ml_dtypes
import numpy as np
import pytest

from gemma3.config import Gemma3TextConfig
from gemma3.weights import (
    Checkpoint,
    CheckpointError,
    SafetensorsFile,
    expected_shapes,
    text_weights,
    write_safetensors,
)

CFG = {
    "model_type": "gemma3_text",
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
}


def fake_checkpoint(tmp_path, dtype=np.float32, prefix="model."):
    c = Gemma3TextConfig.from_dict(CFG)
    rng = np.random.default_rng(0)
    tensors = {prefix + k: rng.standard_normal(s).astype(dtype) for k, s in expected_shapes(c).items()}
    write_safetensors(tmp_path / "model.safetensors", tensors)
    return c, tensors


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_round_trip_in_each_dtype(tmp_path, dtype):
    c, tensors = fake_checkpoint(tmp_path, dtype)
    ckpt = Checkpoint(tmp_path)
    names = text_weights(ckpt, c)
    for name in names.values():
        np.testing.assert_array_equal(ckpt.float32(name), tensors[name].astype(np.float32))


def test_sharded_checkpoint(tmp_path):
    c, tensors = fake_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, members in shards.items():
        write_safetensors(tmp_path / shard, {n: tensors[n] for n in members})
        weight_map.update({n: shard for n in members})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    ckpt = Checkpoint(tmp_path)
    text_weights(ckpt, c)
    np.testing.assert_array_equal(ckpt.float32(names[3]), tensors[names[3]])


def test_all_problems_reported_at_once(tmp_path):
    c = Gemma3TextConfig.from_dict(CFG)
    shapes = expected_shapes(c)
    tensors = {"model." + k: np.zeros(s, np.float32) for k, s in shapes.items()}
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.q_proj.weight"] = np.zeros((16, 15), np.float32)
    tensors["model.layers.0.mlp.down_proj.weight"] = np.zeros((24, 16), np.float32)
    tensors["model.layers.0.extra.weight"] = np.zeros((2,), np.float32)
    write_safetensors(tmp_path / "model.safetensors", tensors)
    with pytest.raises(CheckpointError) as e:
        text_weights(Checkpoint(tmp_path), c)
    msg = str(e.value)
    assert "missing (1): ['layers.1.mlp.up_proj.weight']" in msg
    assert "unexpected (1): ['model.layers.0.extra.weight']" in msg
    assert "model.layers.0.self_attn.q_proj.weight: (16, 15), expected (16, 16);" in msg
    assert "model.layers.0.mlp.down_proj.weight: (24, 16), expected (16, 24) (transposed)" in msg


def test_no_pickles_and_corrupt_files(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match=r"pickle files are never loaded"):
        Checkpoint(tmp_path)
    bad = tmp_path / "model.safetensors"
    bad.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="header length 1000000 exceeds the file size"):
        SafetensorsFile(bad)
    bad.write_bytes((4).to_bytes(8, "little") + b"{no}")
    with pytest.raises(CheckpointError, match="header is not JSON"):
        SafetensorsFile(bad)


def test_reads_what_the_safetensors_library_writes(tmp_path):
    torch = pytest.importorskip("torch", reason="the oracle extra is not installed")
    from safetensors.torch import save_file

    t = {
        "a": torch.randn(3, 5, dtype=torch.bfloat16),
        "b": torch.randn(7, dtype=torch.float16),
        "c": torch.randn(2, 2),
    }
    save_file(t, str(tmp_path / "x.safetensors"))
    f = SafetensorsFile(tmp_path / "x.safetensors")
    for name, v in t.items():
        np.testing.assert_array_equal(f.float32(name), v.float().numpy())
