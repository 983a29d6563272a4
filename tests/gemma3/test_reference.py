"""The NumPy reference model against transformers, on tiny random models."""

import numpy as np
import pytest

from gemma3.config import Gemma3TextConfig
from gemma3.reference import forward
from gemma3.weights import Checkpoint, text_weights
from tests.gemma3.oracle import tiny_model


def load(directory):
    c = Gemma3TextConfig.from_json(directory / "config.json")
    ckpt = Checkpoint(directory)
    names = text_weights(ckpt, c)
    return c, lambda n: ckpt.float32(names[n])


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"num_key_value_heads": 1},  # MQA
        {"final_logit_softcapping": 30.0},
        {
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            }
        },
    ],
    ids=["gqa", "mqa", "softcap", "linear-rope"],
)
def test_logits_match_transformers(tmp_path, overrides):
    torch = pytest.importorskip("torch")
    model = tiny_model(tmp_path, **overrides)
    c, get = load(tmp_path)
    ids = np.random.default_rng(0).integers(3, 300, size=20)  # longer than the window of 8
    with torch.no_grad():
        ref = model(torch.from_numpy(ids[None])).logits[0].numpy()
    ours = forward(c, get, ids)
    scale = np.abs(ref).max()
    assert np.abs(ours - ref).max() <= 1e-4 * scale


def test_left_padding_matches_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    model = tiny_model(tmp_path)
    c, get = load(tmp_path)
    ids = np.array([0, 0, 0, 5, 17, 42, 99, 7, 8, 120, 33, 2, 9, 14])
    mask = (np.arange(len(ids)) >= 3).astype(np.int64)
    with torch.no_grad():
        ref = (
            model(torch.from_numpy(ids[None]), attention_mask=torch.from_numpy(mask[None])).logits[0].numpy()
        )
    ours = forward(c, get, ids, mask)
    scale = np.abs(ref[3:]).max()
    assert np.abs(ours[3:] - ref[3:]).max() <= 1e-4 * scale
