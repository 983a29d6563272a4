"""Gemma3Processor against transformers' Gemma3Processor (PIL image backend) as the oracle."""

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from gemma3.processor import Gemma3ImageProcessor, Gemma3Processor, infer_channel_format
from gemma3.tokenizer import GEMMA3_CHAT_TEMPLATE, Gemma3Tokenizer
from tests.gemma3.tokenizer_fixture import build_tokenizer

H, W = 28, 28  # the configured image size
N_TOKENS = 4  # mm_tokens_per_image
BOI, EOI, SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"


def add_image_tokens(directory, tokens=(EOI, SOFT), config=True):
    """The fixture has <start_of_image>; add the other image tokens (and name them in the config)."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    tok.save(str(directory / "tokenizer.json"))
    if config:
        cfg = json.loads((directory / "tokenizer_config.json").read_text())
        cfg.update(boi_token=BOI, eoi_token=EOI, image_token=SOFT)
        (directory / "tokenizer_config.json").write_text(json.dumps(cfg))
    return directory


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return add_image_tokens(build_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def ours(tok_dir):
    return Gemma3Processor(Gemma3Tokenizer(tok_dir), image_size=(H, W), mm_tokens_per_image=N_TOKENS)


@pytest.fixture(scope="module")
def hf(tok_dir):
    transformers = pytest.importorskip("transformers", reason="the oracle extra is not installed")
    return transformers.Gemma3Processor(
        image_processor=transformers.Gemma3ImageProcessorPil(size={"height": H, "width": W}),
        tokenizer=transformers.AutoTokenizer.from_pretrained(tok_dir),
        image_seq_length=N_TOKENS,
        chat_template=GEMMA3_CHAT_TEMPLATE,
    )


def rgb(h, w, seed=0, channels=3):
    return np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)


def pil(h, w, seed=0, mode="RGB"):
    if mode in ("RGBA", "LA"):
        return Image.fromarray(rgb(h, w, seed, 4)).convert(mode)
    return Image.fromarray(rgb(h, w, seed)).convert(mode)


def assert_same(a, b):
    """Our output equals transformers' (lists stay lists, arrays keep their dtype)."""
    assert set(a) == set(b), (sorted(a), sorted(b))
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert type(a[key]) is type(b[key]) or isinstance(b[key], list), key
        assert np.asarray(a[key]).tolist() == np.asarray(b[key]).tolist(), key
        if not isinstance(b[key], list):
            assert np.asarray(a[key]).dtype == np.asarray(b[key]).dtype, key
    if "pixel_values" in b:
        pa, pb = a["pixel_values"], b["pixel_values"]
        if isinstance(pb, list):
            assert isinstance(pa, list) and len(pa) == len(pb)
            pa, pb = np.stack(pa), np.stack(pb)
        pa, pb = np.asarray(pa), np.asarray(pb)
        assert pa.dtype == pb.dtype == np.float32 and pa.shape == pb.shape
        np.testing.assert_array_equal(pa, pb)


def both(ours, hf, images=None, text=None, **kw):
    kw.setdefault("padding", True)
    kw.setdefault("padding_side", "left")
    a, b = ours(images=images, text=text, **kw), hf(images=images, text=text, **kw)
    assert_same(a, b)
    return a


# ------------------------------------------------------------------------- special tokens


def test_special_tokens_and_image_sequence(ours, hf):
    tok = hf.tokenizer
    assert (ours.boi_token_id, ours.eoi_token_id, ours.image_token_id) == (
        tok.boi_token_id,
        tok.eoi_token_id,
        tok.image_token_id,
    )
    assert ours.full_image_sequence == hf.full_image_sequence
    assert ours.full_image_sequence == f"\n\n{BOI}{SOFT * N_TOKENS}{EOI}\n\n"
    assert ours.image_seq_length == ours.mm_tokens_per_image == N_TOKENS


# ------------------------------------------------------------------------- text and images


@pytest.mark.parametrize("side", ["left", "right"])
def test_text_and_images_match_transformers(ours, hf, side):
    one = both(ours, hf, pil(23, 37), f"Describe {BOI} please.", padding_side=side)
    assert np.asarray(one["token_type_ids"]).sum() == N_TOKENS
    assert np.asarray(one["pixel_values"][0]).shape == (3, H, W)
    both(ours, hf, [pil(23, 37, 1), pil(40, 17, 2)], f"A {BOI} and B {BOI} the end.", padding_side=side)
    batch = both(
        ours,
        hf,
        [[pil(23, 37, 3)], [pil(40, 17, 4), pil(64, 64, 5)]],
        [f"one {BOI}", f"two {BOI}{BOI} with a longer tail after them"],
        padding_side=side,
    )
    mask = np.asarray(batch["attention_mask"])
    assert mask[0].sum() < mask.shape[1] and mask[0, 0 if side == "left" else -1] == 0
    both(ours, hf, [[], [pil(30, 30, 6)]], ["no image here at all", f"{BOI} one"], padding_side=side)


def test_text_only_images_only_and_tensors(ours, hf):
    text_only = both(ours, hf, None, ["Hello world", "The capital of France is Paris."])
    assert "pixel_values" not in text_only and not np.asarray(text_only["token_type_ids"]).any()
    both(ours, hf, [pil(20, 30, 7), pil(50, 25, 8)], None)  # text becomes the markers alone
    np_out = both(ours, hf, [[pil(20, 30)], [pil(31, 19)]], [f"a {BOI}", f"bb bb {BOI}"], return_tensors="np")
    assert np_out["pixel_values"].shape == (2, 3, H, W) and np_out["input_ids"].dtype == np.int64
    assert np_out.input_ids is np_out["input_ids"]
    torch = pytest.importorskip("torch")
    pt = both(
        ours,
        hf,
        [[torch.from_numpy(np.ascontiguousarray(rgb(20, 25, 9).transpose(2, 0, 1)))]],  # CHW tensor
        [f"x {BOI}"],
        return_tensors="pt",
    )
    assert pt["pixel_values"].dtype == torch.float32 and pt["input_ids"].dtype == torch.int64


def test_image_files(ours, hf, tmp_path):
    Image.fromarray(rgb(33, 45, 1)).save(tmp_path / "rgb.png")
    Image.fromarray(rgb(21, 18, 2, 4)).save(tmp_path / "rgba.png")  # the loader drops alpha
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 on load
    Image.fromarray(rgb(30, 50, 3)).save(tmp_path / "rotated.jpg", exif=exif)
    paths = [str(tmp_path / n) for n in ("rgb.png", "rgba.png", "rotated.jpg")]
    out = both(ours, hf, paths, f"{BOI} {BOI} and {BOI}")
    same = ours(
        images=[tmp_path / n for n in ("rgb.png", "rgba.png", "rotated.jpg")], text=f"{BOI} {BOI} and {BOI}"
    )
    assert_same(same, out)  # os.PathLike works too


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "P+transparency", "1", "CMYK", "I;16"])
def test_pil_modes(ours, hf, mode):
    if mode == "P+transparency":
        image = pil(26, 19, 1, "P")
        image.info["transparency"] = 3
    elif mode == "I;16":
        image = Image.fromarray(rgb(26, 19, 1)[..., 0].astype(np.uint16) * 200)
    else:
        image = pil(26, 19, 1, mode)
    both(ours, hf, image, f"look: {BOI}")


@pytest.mark.parametrize(
    "array",
    [
        rgb(23, 37),  # HWC uint8
        np.ascontiguousarray(rgb(23, 37).transpose(2, 0, 1)),  # CHW uint8
        rgb(23, 37, channels=1),  # grayscale HWC
        np.ascontiguousarray(rgb(23, 37, channels=1).transpose(2, 0, 1)),  # grayscale CHW
        rgb(23, 37, channels=4),  # RGBA HWC: composited onto white
        np.ascontiguousarray(rgb(23, 37, channels=4).transpose(2, 0, 1)),  # RGBA CHW
        rgb(4, 9, channels=3),  # ambiguous: read as CHW with 4 channels, as transformers does
        rgb(23, 37).astype(np.float32) / 255,  # floats in [0, 1]: rescaled twice, as transformers
        rgb(23, 37).astype(np.float64),  # whole numbers in [0, 255]
        rgb(23, 37, channels=4).astype(np.float32) / 255,  # float RGBA in [0, 1]
        rgb(23, 37).astype(np.int64),
    ],
    ids=[
        "hwc",
        "chw",
        "gray-hwc",
        "gray-chw",
        "rgba-hwc",
        "rgba-chw",
        "ambiguous",
        "f32",
        "f64-255",
        "f-rgba",
        "i64",
    ],
)
def test_arrays(ours, hf, array):
    both(ours, hf, array, f"an array {BOI}")


def test_image_settings_per_call(ours, hf):
    images = [pil(23, 37, 1), pil(64, 20, 2)]
    both(ours, hf, images, f"{BOI}{BOI}", size={"height": 20, "width": 36})  # non-square target
    both(ours, hf, images, f"{BOI}{BOI}", resample=3)
    both(ours, hf, [rgb(23, 37).astype(np.float32) / 255], f"{BOI}", do_rescale=False)
    both(ours, hf, images, f"{BOI}{BOI}", image_mean=[0.1, 0.2, 0.3], image_std=[0.3, 0.2, 0.1])


def test_pan_and_scan(ours, hf):
    wide, tall, square = pil(20, 70, 1), pil(61, 17, 2), pil(30, 30, 3)
    kw = dict(do_pan_and_scan=True, pan_and_scan_min_crop_size=8)
    out = both(ours, hf, [[wide, square], [tall]], [f"{BOI} and {BOI}", f"tall {BOI}"], **kw)
    assert len(out["pixel_values"]) > 3  # crops were added
    both(
        ours, hf, [wide], f"{BOI}", pan_and_scan_max_num_crops=2, pan_and_scan_min_ratio_to_activate=1.5, **kw
    )


def test_image_processor_alone(hf):
    ours_ip = Gemma3ImageProcessor(size={"height": 24, "width": 40}, resample=3)
    import transformers

    theirs = transformers.Gemma3ImageProcessorPil(size={"height": 24, "width": 40}, resample=3)
    images = [pil(23, 37, 1), rgb(40, 17, 2)]
    a, b = ours_ip(images, return_tensors="np"), theirs(images, return_tensors="np")
    assert a["pixel_values"].shape == (2, 3, 24, 40)
    np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])
    assert infer_channel_format(rgb(5, 6)) == "channels_last"
    assert infer_channel_format(rgb(3, 6)) == "channels_first"


# ------------------------------------------------------------------------- chat template, decode


def test_chat_template_and_decode(ours, hf, tmp_path):
    Image.fromarray(rgb(25, 35, 4)).save(tmp_path / "cat.png")
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": pil(23, 37, 1)},
                {"type": "text", "text": "What is this? And this:"},
                {"type": "image", "path": str(tmp_path / "cat.png")},
            ],
        },
    ]
    for gen in (False, True):
        text = ours.apply_chat_template(messages, add_generation_prompt=gen)
        assert text == hf.apply_chat_template(messages, add_generation_prompt=gen)
        assert text.count(BOI) == 2
    a = ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    b = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert_same(a, b)
    assert np.asarray(a["input_ids"])[0].tolist().count(ours.tokenizer.bos_token_id) == 1
    ids = ours.apply_chat_template(messages, tokenize=True, return_tensors="np")
    assert ids.shape[0] == 1 and (ids == ours.image_token_id).sum() == 2 * N_TOKENS

    batch = ours([[pil(20, 20)], []], [f"Hi {BOI} there", "Plain text, please."], return_tensors="np")
    for skip in (False, True):
        assert ours.batch_decode(batch["input_ids"], skip_special_tokens=skip) == hf.batch_decode(
            batch["input_ids"], skip_special_tokens=skip
        )
        assert ours.decode(batch["input_ids"][1], skip_special_tokens=skip) == hf.decode(
            batch["input_ids"][1], skip_special_tokens=skip
        )


# ------------------------------------------------------------------------- from_pretrained


def test_from_pretrained_reads_what_transformers_saves(hf, tok_dir, tmp_path):
    import transformers

    saved = transformers.Gemma3Processor(
        image_processor=transformers.Gemma3ImageProcessorPil(
            size={"height": 20, "width": 30},
            resample=3,
            image_mean=[0.4, 0.5, 0.6],
            image_std=[0.2, 0.3, 0.4],
        ),
        tokenizer=hf.tokenizer,
        image_seq_length=3,
        chat_template=GEMMA3_CHAT_TEMPLATE,
    )
    saved.save_pretrained(tmp_path)
    mine = Gemma3Processor.from_pretrained(tmp_path)
    assert mine.image_seq_length == 3 and mine.image_processor.size == {"height": 20, "width": 30}
    assert mine.image_processor.resample == 3 and mine.image_processor.image_mean == (0.4, 0.5, 0.6)
    images = [[pil(23, 37, 1)], [pil(40, 17, 2), pil(30, 30, 3)]]
    texts = [f"one {BOI}", f"two {BOI} {BOI}"]
    assert_same(
        mine(images, texts, padding_side="right", return_tensors="np"),
        saved(images=images, text=texts, padding=True, padding_side="right", return_tensors="np"),
    )


def test_from_pretrained_old_layout_and_model_config(tok_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tok_dir / name, tmp_path / name)
    # Only config.json: the vision tower's image size and mm_tokens_per_image.
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gemma3", "mm_tokens_per_image": 7, "vision_config": {"image_size": 42}})
    )
    p = Gemma3Processor.from_pretrained(tmp_path)
    assert p.image_seq_length == 7 and p.image_processor.size == {"height": 42, "width": 42}
    assert p.padding_side == "left" and p.image_processor.image_mean == (0.5, 0.5, 0.5)
    out = p(pil(10, 12), f"{BOI}", return_tensors="np")
    assert out["pixel_values"].shape == (1, 3, 42, 42) and out["token_type_ids"].sum() == 7
    # The Hub's older layout: preprocessor_config.json (nulls mean defaults) + processor_config.json.
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "do_convert_rgb": None,
                "do_normalize": True,
                "do_pan_and_scan": None,
                "do_rescale": True,
                "do_resize": True,
                "image_mean": [0.5, 0.5, 0.5],
                "image_processor_type": "Gemma3ImageProcessor",
                "image_seq_length": 9,
                "image_std": [0.5, 0.5, 0.5],
                "resample": 2,
                "rescale_factor": 0.00392156862745098,
                "size": {"height": 16, "width": 16},
            }
        )
    )
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_seq_length": 5}))
    p = Gemma3Processor.from_pretrained(tmp_path)
    assert p.image_seq_length == 5 and p.image_processor.size == {"height": 16, "width": 16}
    assert p.image_processor.do_convert_rgb is True
    p = Gemma3Processor.from_pretrained(tmp_path, image_size=8, mm_tokens_per_image=2, padding_side="right")
    assert (p.image_seq_length, p.image_processor.size["width"], p.padding_side) == (2, 8, "right")


# ------------------------------------------------------------------------- errors


def test_count_mismatches_raise(ours, request):
    # transformers raises too, when it is installed (its messages differ).
    hf = request.getfixturevalue("hf") if importlib.util.find_spec("transformers") else None
    cases = [
        (pil(20, 20), f"two {BOI} markers {BOI}", "text 0 has 2 .* but 1 image"),
        ([pil(20, 20), pil(20, 20)], [f"a {BOI}", f"b {BOI}"], "one list of images per text"),
        ([[pil(20, 20)], [pil(20, 20)]], [f"a {BOI}", "b"], "text 1 has 0 .* but 1 image"),
        (None, f"a {BOI}", "text 0 has 1 .* no images were given"),
        (pil(20, 20), "no marker at all", "text 0 has 0 .* but 1 image"),
    ]
    for images, text, message in cases:
        with pytest.raises(ValueError, match=message):
            ours(images=images, text=text)
        if hf is not None:
            with pytest.raises(ValueError):
                hf(images=images, text=text)


def test_missing_special_tokens_raise(tmp_path):
    (tmp_path / "a").mkdir()
    no_eoi = build_tokenizer(tmp_path / "a")  # has <start_of_image> only
    with pytest.raises(ValueError, match="no special token '<end_of_image>'"):
        Gemma3Processor(Gemma3Tokenizer(no_eoi))
    (tmp_path / "b").mkdir()
    no_soft = add_image_tokens(build_tokenizer(tmp_path / "b"), tokens=(EOI,), config=False)
    with pytest.raises(ValueError, match="no special token '<image_soft_token>'"):
        Gemma3Processor.from_pretrained(no_soft)


def test_unsupported_inputs_raise(ours, tmp_path):
    for array, message in [
        (rgb(5, 6, channels=2), "cannot tell the channel axis"),
        (np.zeros((7, 8, 5), np.uint8), "cannot tell the channel axis"),
        (np.zeros((5, 6), np.uint8), "3 dimensions"),
        (np.zeros((1, 1, 5, 6, 3), np.uint8), "3 dimensions"),
        (np.full((5, 6, 3), 2.5, np.float32), r"values in \[0, 1\]"),
        (np.full((5, 6, 3), 300.0), r"\[0, 255\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            ours(images=array, text=BOI)
    with pytest.raises(TypeError, match="file path, a PIL image or a NumPy array"):
        ours(images=42, text=BOI)
    with pytest.raises(ValueError, match="no such image file"):
        ours(images=str(tmp_path / "missing.png"), text=BOI)
    with pytest.raises(ValueError, match="URLs are not supported"):
        ours(images="https://example.com/cat.png", text=BOI)
    (tmp_path / "not-an-image.png").write_text("hello")
    with pytest.raises(ValueError, match="not an image file"):
        ours(images=str(tmp_path / "not-an-image.png"), text=BOI)
    with pytest.raises(TypeError, match="string or a list of strings"):
        ours(text=[1, 2])
    with pytest.raises(ValueError, match="needs text, images or both"):
        ours()
    with pytest.raises(ValueError, match="return_tensors"):
        ours(text="hi", return_tensors="tf")
    with pytest.raises(TypeError, match="unexpected argument.*truncation"):
        ours(text="hi", truncation=True)
    with pytest.raises(ValueError, match="differ in shape"):
        ours(text=["a", "a much longer text"], padding=False, return_tensors="np")
    with pytest.raises(ValueError, match="max_length"):
        ours(text="hi", padding="max_length")
    with pytest.raises(ValueError, match="either an image_processor or image settings"):
        Gemma3Processor(ours.tokenizer, Gemma3ImageProcessor(), image_size=10)
    with pytest.raises(ValueError, match="must give .height. and .width."):
        Gemma3ImageProcessor(size={"shortest_edge": 10})
    unpadded = ours(text=["a", "a much longer text"], padding=False)
    assert [len(x) for x in unpadded["input_ids"]] == [len(x) for x in unpadded["attention_mask"]]
    padded = ours(text=["a"], padding="max_length", max_length=6, return_tensors="np")
    assert padded["input_ids"].shape == (1, 6) and padded["attention_mask"][0, 0] == 0


# ------------------------------------------------------------------------- the real tokenizer


def test_real_gemma3_tokenizer(tmp_path):
    """Gemma 3 270M's tokenizer (text only: it lacks <image_soft_token>), when already converted."""
    transformers = pytest.importorskip("transformers", reason="the oracle extra is not installed")
    from gemma3 import default_model
    from gemma3.gguf_import import is_converted

    real = os.path.join(default_model.cache_dir(), default_model.MODEL_DIR_NAME)
    if not is_converted(real):
        pytest.skip("the default model is not converted in the cache")
    with pytest.raises(ValueError, match="no special token '<image_soft_token>'"):
        Gemma3Processor.from_pretrained(real)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(real, name), tmp_path / name)
    add_image_tokens(tmp_path, tokens=(SOFT,))
    ours = Gemma3Processor.from_pretrained(tmp_path, image_size=H, mm_tokens_per_image=N_TOKENS)
    assert (ours.boi_token_id, ours.eoi_token_id, ours.image_token_id) == (255999, 256000, 262144)
    hf = transformers.Gemma3Processor(
        image_processor=transformers.Gemma3ImageProcessorPil(size={"height": H, "width": W}),
        tokenizer=transformers.AutoTokenizer.from_pretrained(tmp_path),
        image_seq_length=N_TOKENS,
    )
    texts = [f"<start_of_turn>user\n{BOI}What is shown here?<end_of_turn>\n", f"Compare {BOI} with {BOI}."]
    images = [[pil(23, 37, 1)], [pil(40, 17, 2), pil(30, 30, 3)]]
    assert_same(
        ours(images, texts, return_tensors="np"),
        hf(images=images, text=texts, padding=True, return_tensors="np"),
    )
