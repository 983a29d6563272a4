"""Generation options beyond plain greedy decoding, against transformers.

Each logits processor against transformers' own class on random logits; generate on a tiny random Gemma3
(fp32) against transformers' generate, token for token, for every option we implement (each setting is
checked to change the output, so the comparison can fail); the NotImplementedError of the options we do not
implement, from a keyword, a GenerationConfig and generation_config.json; torch.manual_seed repeatability.
"""

import inspect
import json

import numpy as np
import pytest

from gemma3 import NPUGemma3ForCausalLM
from gemma3.generation import (
    INERT,
    NOT_IMPLEMENTED,
    GenerationSettings,
    bad_words,
    log_softmax,
    no_repeat_ngram,
    process,
    remove_invalid,
    repetition_penalty,
    suppress,
    warp,
)
from tests.gemma3.oracle import tiny_model
from tests.gemma3.test_multimodal import small, small_inputs, tok_dir  # noqa: F401 (fixtures)

torch = pytest.importorskip("torch", reason="the oracle extra is not installed")
transformers = pytest.importorskip("transformers", reason="the oracle extra is not installed")
from transformers import generation as hf_gen  # noqa: E402

NEW = 12
WIDTH = 12  # prompt width; the second row is left-padded to it
RBLN = dict(
    rbln_npu="tiny", rbln_numerics="fp32", rbln_prefill_chunk_size=64, rbln_max_seq_len=64, rbln_batch_size=2
)


# ---------------------------------------------------------------- each processor against transformers' class


def same(ours, theirs):
    """Equal removed (-inf) entries, and finite values within fp32 rounding."""
    theirs = theirs.numpy() if hasattr(theirs, "numpy") else theirs
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
    keep = ~np.isneginf(theirs)
    np.testing.assert_allclose(ours[keep], theirs[keep], rtol=1e-6, atol=0)


def random_case(vocab=50, length=20, high=None, seed=0):
    """Random (3, vocab) fp32 logits and (3, length) ids below ``high`` (past the vocabulary when larger)."""
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((3, vocab)) * 3).astype(np.float32)
    ids = rng.integers(0, high or vocab, size=(3, length))
    return logits, ids


def t(x):
    return torch.from_numpy(np.array(x))


@pytest.mark.parametrize("penalty, ignore", [(1.3, None), (0.6, None), (1.7, [0, 4, 19])])
def test_repetition_penalty_as_transformers(penalty, ignore):
    logits, ids = random_case(high=60)  # ids past the vocabulary (image tokens) are skipped
    proc = hf_gen.RepetitionPenaltyLogitsProcessor(penalty, None if ignore is None else t(ignore))
    ours = repetition_penalty(ids, logits, penalty, ignore)
    same(ours, proc(t(ids), t(logits)))
    assert not np.array_equal(ours, logits)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_as_transformers(n):
    logits, ids = random_case(length=30, high=4, seed=n)  # few distinct ids: n-grams repeat
    ours = no_repeat_ngram(ids, logits, n)
    same(ours, hf_gen.NoRepeatNGramLogitsProcessor(n)(t(ids), t(logits)))
    assert np.isneginf(ours).any()


def test_bad_words_as_transformers():
    logits, ids = random_case()
    ids[0, -1], ids[1, -2:] = 5, [9, 5]
    words = [[3], [5, 7], [9, 5, 8], [1], [2, 2, 2]]  # [1] is an eos id: transformers drops it
    ours = bad_words(ids, logits, words, eos=[1, 4])
    same(ours, hf_gen.NoBadWordsLogitsProcessor(words, eos_token_id=[1, 4])(t(ids), t(logits)))
    assert np.isneginf(ours[0, [3, 7]]).all() and np.isneginf(ours[1, [3, 7, 8]]).all()
    assert not np.isneginf(ours[:, 1]).any()
    with pytest.raises(
        ValueError, match=r"bad_words_ids: token ids \[50, 99\] are outside the vocabulary of 50"
    ):
        bad_words(ids, logits, [[50], [3, 99]])


@pytest.mark.parametrize(
    "options, proc",
    [
        ({"min_length": 21}, lambda eos: hf_gen.MinLengthLogitsProcessor(21, eos)),
        ({"min_length": 20}, lambda eos: hf_gen.MinLengthLogitsProcessor(20, eos)),
        ({"min_new_tokens": 6}, lambda eos: hf_gen.MinNewTokensLengthLogitsProcessor(15, 6, eos)),
        ({"suppress_tokens": [3, 8, 70]}, lambda eos: hf_gen.SuppressTokensLogitsProcessor([3, 8, 70])),
        (
            {"begin_suppress_tokens": [3, 8]},
            lambda eos: hf_gen.SuppressTokensAtBeginLogitsProcessor([3, 8], 15),
        ),
    ],
)
def test_length_and_suppression_processors_as_transformers(options, proc):
    """ids of 20 tokens after a prompt 15 wide: minimum lengths count padding and prompt, as transformers."""
    logits, ids = random_case()
    s = GenerationSettings.merge({"eos_token_id": [1, 4], **options})
    ours = process(ids, logits, s, prompt_len=15)
    same(ours, proc([1, 4])(t(ids), t(logits)))
    at_begin = process(ids[:, :15], logits, s, prompt_len=15)
    same(at_begin, proc([1, 4])(t(ids[:, :15]), t(logits)))
    assert np.isneginf(ours).any() or np.isneginf(at_begin).any() or options == {"min_length": 20}


def test_invalid_values_and_renormalisation_as_transformers():
    logits, ids = random_case()
    logits[0, 3], logits[1, 4], logits[2, 5] = np.nan, np.inf, -np.inf
    theirs = hf_gen.InfNanRemoveLogitsProcessor()(t(ids), t(logits)).numpy()
    np.testing.assert_array_equal(remove_invalid(logits), theirs)
    finite = remove_invalid(suppress(random_case()[0], [2, 9]))
    assert np.isfinite(finite).all()
    same(log_softmax(finite), hf_gen.LogitNormalization()(t(ids), t(finite)))


@pytest.mark.parametrize(
    "options, procs",
    [
        ({"min_p": 0.1}, lambda: [hf_gen.MinPLogitsWarper(0.1)]),
        (
            {"min_p": 0.3, "temperature": 0.7},
            lambda: [hf_gen.TemperatureLogitsWarper(0.7), hf_gen.MinPLogitsWarper(0.3)],
        ),
        ({"typical_p": 0.5}, lambda: [hf_gen.TypicalLogitsWarper(0.5)]),
        (
            {"typical_p": 0.9, "top_k": 20},
            lambda: [hf_gen.TopKLogitsWarper(20), hf_gen.TypicalLogitsWarper(0.9)],
        ),
        (
            {"temperature": 1.4, "top_k": 30, "top_p": 0.8, "min_p": 0.05, "typical_p": 0.7},
            lambda: [
                hf_gen.TemperatureLogitsWarper(1.4),
                hf_gen.TopKLogitsWarper(30),
                hf_gen.TopPLogitsWarper(0.8),
                hf_gen.MinPLogitsWarper(0.05),
                hf_gen.TypicalLogitsWarper(0.7),
            ],
        ),
    ],
)
def test_min_p_and_typical_p_warpers_as_transformers(options, procs):
    logits, ids = random_case(vocab=64, seed=3)
    ours = warp(logits, GenerationSettings.merge({"top_k": 0, **options}))
    same(ours, hf_gen.LogitsProcessorList(procs())(t(ids), t(logits)))
    assert np.isneginf(ours).any()


# ---------------------------------------------------------------- generate against transformers' generate


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(transformers model, our compiled model, its checkpoint directory)."""
    directory = tmp_path_factory.mktemp("tiny")
    hf = tiny_model(directory)
    return hf, NPUGemma3ForCausalLM.from_pretrained(directory, **RBLN), directory


def prompts():
    """A batch of two, the second left-padded: ids (2, WIDTH) and its attention mask."""
    rng = np.random.default_rng(0)
    ids, mask = np.zeros((2, WIDTH), np.int64), np.zeros((2, WIDTH), np.int64)
    ids[0], mask[0] = rng.integers(3, 300, WIDTH), 1
    ids[1, 5:], mask[1, 5:] = rng.integers(3, 300, WIDTH - 5), 1
    return ids, mask


def ours(model, as_torch=False, **options):
    ids, mask = prompts()
    if as_torch:
        ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=0, **options)
    return np.asarray(out)


def theirs(hf, **options):
    ids, mask = prompts()
    with torch.no_grad():
        return hf.generate(
            torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=NEW,
            pad_token_id=0,
            **options,
        ).numpy()


def differs(a, b):
    return a.shape != b.shape or not np.array_equal(a, b)


# Each takes our plain greedy new tokens g (2, NEW) and returns options that change them.
GREEDY_OPTIONS = {
    "repetition_penalty": lambda g: {"repetition_penalty": 1.5},
    "repetition_reward": lambda g: {"repetition_penalty": 0.7},
    "no_repeat_ngram_size=1": lambda g: {"no_repeat_ngram_size": 1},
    "no_repeat_ngram_size=2": lambda g: {"no_repeat_ngram_size": 2},
    "min_new_tokens": lambda g: {"eos_token_id": int(g[0, 2]), "min_new_tokens": 8},
    "min_length": lambda g: {"eos_token_id": [int(g[1, 1]), 1], "min_length": WIDTH + 6},
    "bad_words_ids": lambda g: {"bad_words_ids": [[int(g[0, 0])], [int(g[1, 0]), int(g[1, 1])]]},
    "suppress_tokens": lambda g: {"suppress_tokens": [int(g[0, 1]), int(g[1, 3])]},
    "begin_suppress_tokens": lambda g: {"begin_suppress_tokens": [int(g[0, 0]), int(g[1, 0])]},
    "all_together": lambda g: {
        "repetition_penalty": 1.2,
        "no_repeat_ngram_size": 3,
        "bad_words_ids": [[int(g[1, 2])]],
        "eos_token_id": int(g[0, 3]),
        "min_new_tokens": 5,
        "suppress_tokens": [int(g[0, 5])],
        "begin_suppress_tokens": [int(g[1, 0])],
    },
}


@pytest.fixture(scope="module")
def plain(models):
    """Our plain greedy sequences (2, WIDTH + NEW)."""
    return ours(models[1])


@pytest.mark.parametrize("name", list(GREEDY_OPTIONS))
def test_greedy_options_match_transformers_generate(models, plain, name):
    hf, model, _ = models
    options = GREEDY_OPTIONS[name](plain[:, WIDTH:])
    got = ours(model, **options)
    np.testing.assert_array_equal(got, theirs(hf, do_sample=False, **options))
    baseline = ours(model, eos_token_id=options["eos_token_id"]) if "eos_token_id" in options else plain
    assert differs(got, baseline), f"{name}: {options} does not change the greedy output"


def test_scores_renormalised_and_invalid_values_removed_as_transformers(models):
    """remove_invalid_values turns the -inf of eos tokens held back by min_new_tokens into fp32's lowest value
    (suppress_tokens comes after it: its -inf stays), renormalize_logits gives log-probabilities: the returned
    scores (not the tokens) change, as transformers'."""
    hf, model, _ = models
    options = dict(
        eos_token_id=[5, 6],
        min_new_tokens=4,
        suppress_tokens=[7],
        remove_invalid_values=True,
        renormalize_logits=True,
    )
    ids, mask = prompts()
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=4,
        return_dict_in_generate=True,
        output_scores=True,
        **options,
    )
    with torch.no_grad():
        ref = hf.generate(
            torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=4,
            return_dict_in_generate=True,
            output_scores=True,
            do_sample=False,
            **options,
        )
    np.testing.assert_array_equal(out.sequences, ref.sequences.numpy())
    for mine, their in zip(out.scores, ref.scores):
        their = their.numpy()
        assert (mine[:, [5, 6]] == np.finfo(np.float32).min).all() and np.isneginf(mine[:, 7]).all()
        np.testing.assert_array_equal(mine[:, 5:8], their[:, 5:8])
        np.testing.assert_allclose(np.exp(mine).sum(-1), 1, rtol=1e-5)
        # Log-probabilities of logits within 1e-4 of transformers' (see test_model.py).
        rest = np.delete(np.arange(mine.shape[1]), [5, 6, 7])
        np.testing.assert_allclose(mine[:, rest], their[:, rest], atol=1e-4 * np.abs(their[:, rest]).max())


@pytest.mark.slow  # compiles an image+text model; its generate loop is the text model's, tested above
def test_options_with_image_tokens_in_the_prompt_match_transformers(request):
    """The image+text model: the prompt's image tokens count for the repetition penalty and the n-grams."""
    _, hf, model, processor = request.getfixturevalue("small")  # test_multimodal.py's compiled tiny model
    inputs = small_inputs(processor)
    pt = {k: torch.from_numpy(v) for k, v in inputs.items()}
    options = dict(repetition_penalty=1.5, no_repeat_ngram_size=2, max_new_tokens=NEW, pad_token_id=0)
    got = model.generate(**inputs, **options)
    with torch.no_grad():
        np.testing.assert_array_equal(got, hf.generate(**pt, do_sample=False, **options).numpy())
    assert differs(got, model.generate(**inputs, max_new_tokens=NEW, pad_token_id=0))


SAMPLING_OPTIONS = [
    {"temperature": 0.8, "top_k": 20, "top_p": 0.9},
    {"min_p": 0.1, "top_k": 0},
    {"typical_p": 0.5, "top_k": 0, "temperature": 1.3},
    {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "min_p": 0.05, "top_k": 40},
]


@pytest.mark.parametrize("options", SAMPLING_OPTIONS)
def test_sampling_matches_transformers_under_torch_manual_seed(models, plain, options):
    """torch inputs, no seed: we draw from torch's global generator exactly as transformers does."""
    hf, model, _ = models
    torch.manual_seed(3)
    got = ours(model, as_torch=True, do_sample=True, **options)
    torch.manual_seed(3)
    np.testing.assert_array_equal(got, theirs(hf, do_sample=True, **options))
    assert differs(got, plain)


def test_torch_manual_seed_and_seed_make_sampling_repeatable(models):
    _, model, _ = models
    runs = []
    for s in (5, 5, 6):
        torch.manual_seed(s)
        runs.append(ours(model, as_torch=True, do_sample=True, top_k=0))
    assert np.array_equal(runs[0], runs[1]) and differs(runs[0], runs[2])
    # An explicit seed draws from NumPy, the same tokens whatever the input kind or torch's state.
    torch.manual_seed(5)
    seeded = ours(model, as_torch=True, do_sample=True, top_k=0, seed=11)
    assert np.array_equal(seeded, ours(model, do_sample=True, top_k=0, seed=11))
    assert differs(seeded, ours(model, do_sample=True, top_k=0, seed=12))


def test_a_keyword_set_to_none_turns_the_option_off_as_in_transformers(models):
    """transformers sets generate's keywords on its GenerationConfig as given: None is off, not unset."""
    hf, model, _ = models
    released = {"do_sample": True, "top_k": 3, "temperature": 0.5, "eos_token_id": [1, 106], "min_p": 0.2}
    s = GenerationSettings.merge(
        released,
        {"top_k": None, "temperature": None, "eos_token_id": None, "min_p": None},
        names=("generation_config.json", "a keyword"),
        none_turns_off=("a keyword",),
    )
    assert (s.do_sample, s.top_k, s.temperature, s.eos_token_id, s.min_p) == (True, None, 1.0, [], None)
    kept = GenerationSettings.merge(released, {"top_k": None, "temperature": None})
    assert (kept.top_k, kept.temperature) == (3, 0.5)
    # Through generate, against transformers: top_k=None samples from the whole vocabulary, not the top 50.
    torch.manual_seed(0)
    got = ours(model, as_torch=True, do_sample=True, top_k=None)
    torch.manual_seed(0)
    np.testing.assert_array_equal(got, theirs(hf, do_sample=True, top_k=None))
    torch.manual_seed(0)
    assert differs(got, ours(model, as_torch=True, do_sample=True))


# ---------------------------------------------------------------- what we do not implement raises


# name -> (a value that acts, other options it needs to act, a value that does not act or None)
ACTING = {
    "num_beams": (4, {}, 1),
    "num_beam_groups": (2, {}, 1),
    "constraints": ([object()], {}, None),
    "force_words_ids": ([[5]], {}, None),
    "penalty_alpha": (0.6, {"top_k": 4}, 0.0),
    "dola_layers": ("high", {}, None),
    "assistant_model": (object(), {}, None),
    "prompt_lookup_num_tokens": (10, {}, None),
    "assistant_early_exit": (2, {}, None),
    "use_mtp": (True, {}, False),
    "custom_generate": ("some/repo", {}, None),
    "num_return_sequences": (3, {"do_sample": True}, 1),
    "guidance_scale": (1.5, {}, 1.0),
    "sequence_bias": ({(5,): 2.0}, {}, {}),
    "encoder_repetition_penalty": (1.2, {}, 1.0),
    "encoder_no_repeat_ngram_size": (2, {}, 0),
    "forced_bos_token_id": (2, {}, None),
    "forced_eos_token_id": (1, {}, None),
    "exponential_decay_length_penalty": ((5, 1.5), {}, None),
    "watermarking_config": ({"bias": 2.0}, {}, None),
    "top_h": (0.4, {"do_sample": True}, None),
    "epsilon_cutoff": (3e-4, {"do_sample": True}, 0.0),
    "eta_cutoff": (1e-3, {"do_sample": True}, 0.0),
    "stop_strings": (["\n"], {}, None),
    "max_time": (5.0, {}, None),
    "token_healing": (True, {}, False),
    "logits_processor": ([lambda ids, scores: scores], {}, []),
    "stopping_criteria": ([lambda ids, scores: False], {}, []),
    "prefix_allowed_tokens_fn": (lambda batch, ids: [5], {}, None),
    "negative_prompt_ids": (np.array([[5]]), {}, None),
    "negative_prompt_attention_mask": (np.array([[1]]), {}, None),
    "output_attentions": (True, {"return_dict_in_generate": True}, False),
    "output_hidden_states": (True, {"return_dict_in_generate": True}, False),
}


def test_every_transformers_option_is_implemented_refused_or_inert():
    """A GenerationConfig field or generate argument of a newer transformers must be classified here."""
    options = set(transformers.GenerationConfig().to_dict())
    options |= set(inspect.signature(transformers.GenerationMixin.generate).parameters)
    handled = set(GenerationSettings.__dataclass_fields__) | set(NOT_IMPLEMENTED) | INERT
    assert options - handled - {"self", "inputs", "generation_config", "streamer", "kwargs"} == set()
    assert set(ACTING) == set(NOT_IMPLEMENTED)


@pytest.mark.parametrize("name", list(ACTING))
def test_each_option_we_do_not_implement_raises_naming_it(name):
    value, needs, inert = ACTING[name]
    with pytest.raises(
        NotImplementedError, match=rf"generate: {name}=.* \(from a keyword\) asks for .*; set {name}="
    ):
        GenerationSettings.merge({"do_sample": False}, {**needs, name: value}, names=("model", "a keyword"))
    GenerationSettings.merge({**needs, name: inert})  # an inert value is accepted


def test_sampling_only_and_contrastive_options_are_inert_when_greedy():
    GenerationSettings.merge({"top_h": 0.4, "epsilon_cutoff": 3e-4, "eta_cutoff": 1e-3, "do_sample": False})
    GenerationSettings.merge({"penalty_alpha": 0.6, "top_k": 1})  # transformers: greedy, not contrastive
    GenerationSettings.merge({"penalty_alpha": 0.6, "do_sample": True})
    with pytest.raises(
        NotImplementedError, match=r"penalty_alpha=0.6 \(from source 0\) asks for contrastive"
    ):
        GenerationSettings.merge({"penalty_alpha": 0.6})  # top_k defaults to 50, as in transformers
    with pytest.raises(ValueError, match=r"num_beams='4' \(from source 0\) is not a valid value"):
        GenerationSettings.merge({"num_beams": "4"})


def test_refusals_from_a_keyword_a_generation_config_and_generation_config_json(models, tmp_path):
    _, model, _ = models
    ids, mask = prompts()
    with pytest.raises(NotImplementedError, match=r"num_beams=4 \(from a keyword\) asks for beam search"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, num_beams=4)
    with pytest.raises(
        NotImplementedError, match=r"assistant_model=<object .*> \(from a keyword\) asks for assisted"
    ):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, assistant_model=object())
    config = transformers.GenerationConfig(guidance_scale=2.0, repetition_penalty=1.2)
    with pytest.raises(
        NotImplementedError, match=r"guidance_scale=2.0 \(from the generation_config argument\)"
    ):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, generation_config=config)
    # Inert options stay accepted, as keywords and in a GenerationConfig.
    config = transformers.GenerationConfig(num_beams=1, use_cache=True, repetition_penalty=1.2)
    model.generate(ids, attention_mask=mask, max_new_tokens=2, generation_config=config, output_scores=True)
    model.generate(ids, attention_mask=mask, max_new_tokens=2, use_cache=False, synced_gpus=False)

    model.save_pretrained(tmp_path)
    path = tmp_path / "generation_config.json"
    # A released Gemma 3 checkpoint's defaults: sampling with top-k 64 and top-p 0.95, inert beam settings.
    released = {
        "cache_implementation": "hybrid",
        "do_sample": True,
        "top_k": 64,
        "top_p": 0.95,
        "num_beams": 1,
    }
    path.write_text(json.dumps({**json.loads(path.read_text()), **released, "epsilon_cutoff": 0.0}))
    NPUGemma3ForCausalLM.from_pretrained(tmp_path).generate(
        ids, attention_mask=mask, max_new_tokens=2, seed=0
    )
    path.write_text(json.dumps({**released, "no_repeat_ngram_size": 2, "num_beams": 3}))
    loaded = NPUGemma3ForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(
        NotImplementedError, match=r"num_beams=3 \(from generation_config.json\) asks for beam search"
    ):
        loaded.generate(ids, attention_mask=mask, max_new_tokens=2)
    # A keyword overrides the file's value, as in transformers.
    got = loaded.generate(
        ids, attention_mask=mask, max_new_tokens=NEW, num_beams=1, do_sample=False, pad_token_id=0
    )
    np.testing.assert_array_equal(got, ours(model, no_repeat_ngram_size=2))
