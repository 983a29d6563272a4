import numpy as np
import pytest

from gemma3.generation import GenerationSettings, generate_loop, warp


class Recorder:
    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(np.asarray(value).tolist())

    def end(self):
        self.calls.append("end")


def scripted(vocab, script):
    """prefill/decode returning logits that pick script[b][step] for sequence b."""
    step = {"n": 0}

    def logits():
        out = np.zeros((len(script), vocab), np.float32)
        for b, seq in enumerate(script):
            out[b, seq[min(step["n"], len(seq) - 1)]] = 5.0
        step["n"] += 1
        return out

    return (lambda ids, mask: logits()), (lambda tokens: logits())


def test_greedy_stops_on_any_eos_and_pads_finished_rows():
    prefill, decode = scripted(10, [[4, 1, 7, 7], [5, 6, 9, 3]])
    s = GenerationSettings.merge({"eos_token_id": [1, 9], "pad_token_id": 0, "max_new_tokens": 8})
    rec = Recorder()
    seqs, logits, _ = generate_loop(prefill, decode, np.array([[2, 3], [2, 8]]), np.ones((2, 2)), s, rec)
    assert seqs.tolist() == [[2, 3, 4, 1, 0], [2, 8, 5, 6, 9]]
    assert len(logits) == 3 and logits[0].shape == (2, 10)
    assert rec.calls[0] == [[2, 3], [2, 8]] and rec.calls[-1] == "end" and rec.calls[1] == [4, 5]


def test_budget_from_max_new_tokens_or_max_length():
    prefill, decode = scripted(10, [[4]])
    seqs, _, _ = generate_loop(
        prefill, decode, np.array([[2, 3, 5]]), None, GenerationSettings.merge({"max_length": 6})
    )
    assert seqs.shape == (1, 6)
    prefill, decode = scripted(10, [[4]])
    seqs, _, _ = generate_loop(
        prefill,
        decode,
        np.array([[2, 3, 5]]),
        None,
        GenerationSettings.merge({"max_length": 6, "max_new_tokens": 1}),
    )
    assert seqs.shape == (1, 4)


def test_later_sources_win_and_bad_values_are_named():
    s = GenerationSettings.merge(
        {"max_new_tokens": 5, "eos_token_id": 1},
        {"eos_token_id": [1, 106]},
        {"max_new_tokens": 7, "unknown_flag": 1},
    )
    assert s.max_new_tokens == 7 and s.eos_token_id == [1, 106]
    with pytest.raises(ValueError, match="top_p must be in"):
        GenerationSettings.merge({"top_p": 0.0})
    with pytest.raises(ValueError, match="temperature must be > 0"):
        GenerationSettings.merge({"do_sample": True, "temperature": 0.0})


def test_sampling_is_reproducible_with_a_seed():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((40, 50)).astype(np.float32)

    def run(seed):
        it = iter(table)
        s = GenerationSettings.merge(
            {"do_sample": True, "max_new_tokens": 30, "seed": seed, "top_k": 10, "top_p": 0.9}
        )
        seqs, _, _ = generate_loop(
            lambda i, m: next(it)[None], lambda t: next(it)[None], np.array([[1]]), None, s
        )
        return seqs

    assert (run(3) == run(3)).all() and not (run(3) == run(4)).all()


@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(1.0, 5, 1.0), (0.7, 50, 0.9), (1.3, 3, 0.5), (1.0, 0, 0.95)]
)
def test_warpers_agree_with_transformers(temperature, top_k, top_p):
    torch = pytest.importorskip("torch", reason="the oracle extra is not installed")
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    procs = [TemperatureLogitsWarper(temperature)]
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        procs.append(TopPLogitsWarper(top_p))
    ref = LogitsProcessorList(procs)(None, torch.from_numpy(logits.copy())).numpy()
    ours = warp(
        logits, GenerationSettings.merge({"temperature": temperature, "top_k": top_k, "top_p": top_p})
    )
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    np.testing.assert_allclose(ours[~np.isinf(ours)], ref[~np.isinf(ref)], rtol=1e-6)
