"""Gemma 3's processor: images to ``pixel_values``, text (with image markers) to token ids.

It gives what transformers' ``Gemma3Processor`` with the PIL/NumPy image processor
(``Gemma3ImageProcessorPil``) gives, with NumPy and Pillow only:

- Images (file paths, PIL images, NumPy arrays) become RGB (an alpha channel is composited onto
  white), are resized with Pillow (bilinear by default) to the configured ``(height, width)``,
  scaled by 1/255, normalised with mean and std 0.5 and laid out channels first:
  ``pixel_values`` of shape (N, 3, H, W), float32.
- Every ``<start_of_image>`` in the text becomes ``"\\n\\n<start_of_image>"``, then
  ``mm_tokens_per_image`` times ``<image_soft_token>``, then ``"<end_of_image>\\n\\n"``; the text is
  tokenised with :class:`gemma3.tokenizer.Gemma3Tokenizer`. ``token_type_ids`` is 1 at image soft
  tokens and 0 elsewhere.

Image inputs follow transformers' rules, quirks included: a path is opened, EXIF-rotated and
converted with Pillow's ``convert("RGB")`` (so a transparent PNG *file* loses its alpha channel,
while a transparent PIL *image* is composited onto white); the channel axis of an array is the
first axis when it has 1, 3 or 4 entries, else the last; a float array whose values lie in [0, 1]
goes through the resize as ``x * 255`` and comes back divided by 255, and is then *also* scaled
by ``rescale_factor``, so pass ``do_rescale=False`` for such arrays.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os

import numpy as np

BOI_TOKEN = "<start_of_image>"
EOI_TOKEN = "<end_of_image>"
IMAGE_TOKEN = "<image_soft_token>"
DEFAULT_IMAGE_SIZE = 896  # Gemma 3's SigLIP (4B and larger)
DEFAULT_MM_TOKENS_PER_IMAGE = 256
BILINEAR = 2  # PIL.Image.Resampling.BILINEAR (transformers' PILImageResampling has the same values)
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
# The processor's defaults for pan and scan (transformers' Gemma3Processor.images_kwargs).
PAN_AND_SCAN_DEFAULTS = {
    "pan_and_scan_min_crop_size": 256,
    "pan_and_scan_max_num_crops": 4,
    "pan_and_scan_min_ratio_to_activate": 1.2,
}
CHANNELS = (1, 3, 4)


def _pil():
    try:
        import PIL.Image
        import PIL.ImageOps
    except ImportError:  # pragma: no cover - Pillow is a dependency
        raise ImportError("Gemma3 image processing needs Pillow: pip install pillow") from None
    return PIL


class ProcessorOutput(dict):
    """The processor's result: a dict whose keys can also be read as attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


# ----------------------------------------------------------------------------- image inputs


def _is_pil(x) -> bool:
    PIL = _pil()
    return isinstance(x, PIL.Image.Image)


def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "numpy")


def _is_image(x) -> bool:
    return isinstance(x, np.ndarray) or _is_pil(x)


def load_image(path):
    """Open an image file the way transformers' ``load_image`` does: EXIF-rotated, RGB."""
    PIL = _pil()
    name = os.fspath(path)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    if name.startswith(("http://", "https://")):
        raise ValueError(f"{name}: URLs are not supported; download the image and pass its path")
    if not os.path.isfile(name):
        raise ValueError(f"{name}: no such image file (URLs and base64 strings are not supported)")
    try:
        with PIL.Image.open(name) as image:
            return PIL.ImageOps.exif_transpose(image).convert("RGB")
    except PIL.UnidentifiedImageError:
        raise ValueError(f"{name}: not an image file Pillow can read") from None


def _fetch(images):
    """Paths become PIL images, torch tensors NumPy arrays; lists and tuples become lists."""
    if isinstance(images, (list, tuple)):
        return [_fetch(x) for x in images]
    if isinstance(images, (str, os.PathLike)):
        return load_image(images)
    if _is_torch(images):
        return images.detach().cpu().numpy()
    if _is_image(images):
        return images
    raise TypeError(
        "an image must be a file path, a PIL image or a NumPy array (or a list of them, or one "
        f"list per text), got {type(images).__name__}"
    )


def _is_list_of_images(x) -> bool:
    return bool(x) and all(_is_image(i) for i in x)


def _nest(images) -> list[list]:
    """transformers' ``make_nested_list_of_images``: one list of images per text."""
    if isinstance(images, list) and all(
        isinstance(x, list) and (not x or _is_list_of_images(x)) for x in images
    ):
        return images
    if isinstance(images, list) and _is_list_of_images(images):
        if _is_pil(images[0]) or images[0].ndim == 3:
            return [images]
        if images[0].ndim == 4:
            return [list(x) for x in images]
    if _is_image(images):
        if _is_pil(images) or images.ndim == 3:
            return [[images]]
        if images.ndim == 4:
            return [list(images)]
    raise ValueError(
        "images must be one image, a list of images (for one text) or one list of images per "
        "text; an image array must have 3 dimensions (height, width and channels, in either "
        "order) and a batch of them 4"
    )


def _flatten(images) -> list:
    """transformers' ``make_flat_list_of_images``."""
    if isinstance(images, list) and all(
        isinstance(x, list) and (not x or _is_list_of_images(x)) for x in images
    ):
        return [i for x in images for i in x]
    return [i for x in _nest(images) for i in x]


def infer_channel_format(image: np.ndarray, num_channels=CHANNELS) -> str:
    """``"channels_first"`` or ``"channels_last"``, decided as transformers does.

    The first axis wins when it has 1, 3 or 4 entries (even when the last one has too), else the
    last axis when it has; anything else is an error."""
    if image.ndim != 3:
        raise ValueError(
            f"an image array must have 3 dimensions (height, width, channels in either order), "
            f"got shape {image.shape}"
        )
    if image.shape[0] in num_channels:
        return "channels_first"
    if image.shape[-1] in num_channels:
        return "channels_last"
    raise ValueError(
        f"cannot tell the channel axis of an image of shape {image.shape}: neither its first nor its "
        f"last axis has {' or '.join(map(str, num_channels))} entries (grayscale, RGB or RGBA)"
    )


def _check_format(fmt):
    if fmt not in (None, "channels_first", "channels_last"):
        raise ValueError(f"input_data_format must be 'channels_first' or 'channels_last', got {fmt!r}")
    return fmt


def _convert_to_rgb(image, input_data_format=None) -> np.ndarray:
    """transformers' ``convert_to_rgb`` (return_numpy=True): alpha is composited onto white."""
    PIL = _pil()
    if _is_pil(image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = PIL.Image.alpha_composite(white, rgba).convert("RGB")
        else:
            rgb = image.convert("RGB")
        return np.array(rgb)
    fmt = input_data_format or infer_channel_format(image)
    axis = -1 if fmt == "channels_last" else 0
    image = np.moveaxis(image, axis, -1)
    channels = image.shape[-1]
    if channels == 1:
        rgb = np.repeat(image, 3, axis=-1)
    elif channels == 4:
        floating = np.issubdtype(image.dtype, np.floating)
        if floating and (image.min() < 0.0 or image.max() > 1.0):
            raise ValueError(
                "a float RGBA image must have values in [0, 1] to composite it onto white, got "
                f"[{image.min()}, {image.max()}]"
            )
        white = 255 if np.issubdtype(image.dtype, np.integer) else 1.0
        alpha = image[..., 3:4] / white
        composite = alpha * image[..., :3] + (1 - alpha) * white
        rgb = np.round(composite).astype(image.dtype) if white == 255 else composite.astype(image.dtype)
    else:
        rgb = image
    return np.moveaxis(rgb, -1, axis)


def _to_chw(image, do_convert_rgb: bool, input_data_format=None) -> np.ndarray:
    """transformers' ``PilBackend.process_image``: one image as a channels-first array."""
    pil = _is_pil(image)
    if not pil and image.ndim != 3:
        infer_channel_format(image)  # raises the shape error
    if do_convert_rgb:
        image = _convert_to_rgb(image, input_data_format)
    elif pil:
        image = np.array(image)
    if image.ndim == 2:
        return image[None]
    if pil:
        return np.moveaxis(image, -1, 0)
    fmt = input_data_format or infer_channel_format(image)
    return np.moveaxis(image, -1, 0) if fmt == "channels_last" else image


def _rescale(image: np.ndarray, scale: float) -> np.ndarray:
    return (image.astype(np.float64) * scale).astype(np.float32)


def _rescale_for_pil(image: np.ndarray) -> bool:
    """Whether an array must be multiplied by 255 to become uint8 for Pillow (transformers' rule)."""
    if image.dtype == np.uint8:
        return False
    if np.allclose(image, image.astype(int)):
        if np.all(image >= 0) and np.all(image <= 255):
            return False
        raise ValueError(
            f"an integer-valued image must lie in [0, 255] to be resized, got [{image.min()}, {image.max()}]"
        )
    if np.all(image >= 0) and np.all(image <= 1):
        return True
    raise ValueError(
        "a float image must have values in [0, 1] (or be whole numbers in [0, 255]) to be resized, "
        f"got [{image.min()}, {image.max()}]"
    )


def _resize(image: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """transformers' ``image_transforms.resize`` on a channels-first array, through Pillow."""
    PIL = _pil()
    scaled = _rescale_for_pil(image)
    hwc = np.moveaxis(image, 0, -1)
    if hwc.shape[-1] == 1:
        hwc = hwc[..., 0]
    if scaled:
        hwc = _rescale(hwc, 255)
    pil = PIL.Image.fromarray(hwc.astype(np.uint8))
    out = np.array(pil.resize((width, height), resample=PIL.Image.Resampling(resample), reducing_gap=None))
    if out.ndim == 2:
        out = out[..., None]
    out = np.moveaxis(out, -1, 0)
    return _rescale(out, 1 / 255) if scaled else out


def _normalize(image: np.ndarray, mean, std) -> np.ndarray:
    """transformers' ``normalize`` on a channels-first array (float32 for integer input)."""
    channels = image.shape[0]
    if not np.issubdtype(image.dtype, np.floating):
        image = image.astype(np.float32)
    values = []
    for name, v in (("image_mean", mean), ("image_std", std)):
        if isinstance(v, (list, tuple, np.ndarray)):
            if len(v) != channels:
                raise ValueError(f"{name} must have {channels} entries, got {len(v)}")
            v = list(v)
        else:
            v = [v] * channels
        values.append(np.array(v, dtype=image.dtype)[:, None, None])
    return (image - values[0]) / values[1]


def _pan_and_scan(image: np.ndarray, min_crop_size: int, max_num_crops: int, min_ratio: float):
    """Crops of a wide or tall channels-first image (transformers' ``pan_and_scan``)."""
    height, width = image.shape[-2:]
    if width >= height:
        if width / height < min_ratio:
            return []
        crops_w = int(math.floor(width / height + 0.5))
        crops_w = min(int(math.floor(width / min_crop_size)), crops_w)
        crops_w = min(max_num_crops, max(2, crops_w))
        crops_h = 1
    else:
        if height / width < min_ratio:
            return []
        crops_h = int(math.floor(height / width + 0.5))
        crops_h = min(int(math.floor(height / min_crop_size)), crops_h)
        crops_h = min(max_num_crops, max(2, crops_h))
        crops_w = 1
    size_w = int(math.ceil(width / crops_w))
    size_h = int(math.ceil(height / crops_h))
    if min(size_w, size_h) < min_crop_size:
        return []
    return [
        image[:, y : y + size_h, x : x + size_w]
        for y, x in itertools.product(
            [size_h * i for i in range(crops_h)], [size_w * i for i in range(crops_w)]
        )
    ]


def _size_hw(size) -> tuple[int, int]:
    if isinstance(size, dict):
        if "height" not in size or "width" not in size:
            raise ValueError(
                f"size must give 'height' and 'width' (Gemma 3 resizes to a fixed size), got {size}"
            )
        h, w = size["height"], size["width"]
    elif isinstance(size, (list, tuple)):
        if len(size) != 2:
            raise ValueError(f"size must be (height, width), got {size}")
        h, w = size
    else:
        h = w = size
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in (h, w)):
        raise ValueError(f"image height and width must be positive integers, got {size!r}")
    return int(h), int(w)


def _resample(value) -> int:
    v = int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else None
    if v not in RESAMPLE_NAMES:
        raise ValueError(
            f"resample must be a Pillow resampling filter (0..5, e.g. 2 = bilinear), got {value!r}"
        )
    return v


def _convert(values, return_tensors, what: str):
    """Lists (None), one NumPy array ("np") or one torch tensor ("pt")."""
    if return_tensors is None:
        return values
    shapes = {np.shape(v) for v in values}
    if len(shapes) > 1:
        raise ValueError(
            f"cannot return {what} as one {return_tensors!r} tensor: its rows differ in shape "
            f"({sorted(shapes)}); pad the text (padding=True) or resize the images (do_resize=True)"
        )
    array = np.stack([np.asarray(v) for v in values]) if values else np.asarray(values)
    if return_tensors == "np":
        return array
    import torch

    return torch.from_numpy(np.ascontiguousarray(array))


def _check_return_tensors(return_tensors):
    if return_tensors not in (None, "np", "pt"):
        raise ValueError(f"return_tensors must be None, 'np' or 'pt', got {return_tensors!r}")
    if return_tensors == "pt":
        try:
            import torch  # noqa: F401
        except ImportError:
            raise ImportError("return_tensors='pt' needs torch, which is not installed") from None


# ----------------------------------------------------------------------------- image processor


class Gemma3ImageProcessor:
    """Images to ``pixel_values`` as transformers' ``Gemma3ImageProcessorPil`` computes them.

    ``size`` is an int, ``(height, width)`` or ``{"height": H, "width": W}``. ``None`` for any
    setting means its default, as in a ``preprocessor_config.json``. Pan and scan is off unless
    ``do_pan_and_scan`` is true; its parameters then default to 256 / 4 / 1.2."""

    model_input_names = ["pixel_values", "num_crops"]
    SETTINGS = (
        "size",
        "resample",
        "do_resize",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "image_mean",
        "image_std",
        "do_convert_rgb",
        "do_pan_and_scan",
        "pan_and_scan_min_crop_size",
        "pan_and_scan_max_num_crops",
        "pan_and_scan_min_ratio_to_activate",
    )

    def __init__(
        self,
        size=None,
        resample=None,
        do_resize=None,
        do_rescale=None,
        rescale_factor=None,
        do_normalize=None,
        image_mean=None,
        image_std=None,
        do_convert_rgb=None,
        do_pan_and_scan=None,
        pan_and_scan_min_crop_size=None,
        pan_and_scan_max_num_crops=None,
        pan_and_scan_min_ratio_to_activate=None,
    ):
        h, w = _size_hw(DEFAULT_IMAGE_SIZE if size is None else size)
        self.size = {"height": h, "width": w}
        self.resample = _resample(BILINEAR if resample is None else resample)
        self.do_resize = True if do_resize is None else bool(do_resize)
        self.do_rescale = True if do_rescale is None else bool(do_rescale)
        self.rescale_factor = 1 / 255 if rescale_factor is None else float(rescale_factor)
        self.do_normalize = True if do_normalize is None else bool(do_normalize)
        self.image_mean = IMAGE_MEAN if image_mean is None else _mean_std(image_mean)
        self.image_std = IMAGE_STD if image_std is None else _mean_std(image_std)
        self.do_convert_rgb = True if do_convert_rgb is None else bool(do_convert_rgb)
        self.do_pan_and_scan = do_pan_and_scan
        self.pan_and_scan_min_crop_size = pan_and_scan_min_crop_size
        self.pan_and_scan_max_num_crops = pan_and_scan_max_num_crops
        self.pan_and_scan_min_ratio_to_activate = pan_and_scan_min_ratio_to_activate

    @classmethod
    def from_dict(cls, config: dict) -> Gemma3ImageProcessor:
        """From a ``preprocessor_config.json`` dict (keys other than the settings are ignored)."""
        return cls(**{k: v for k, v in config.items() if k in cls.SETTINGS})

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.SETTINGS}
        for key in ("image_mean", "image_std"):
            d[key] = list(d[key]) if isinstance(d[key], tuple) else d[key]
        return d

    def __repr__(self) -> str:
        return f"Gemma3ImageProcessor({self.to_dict()})"

    def _settings(self, overrides: dict) -> dict:
        unknown = set(overrides) - set(self.SETTINGS)
        if unknown:
            raise TypeError(
                f"unexpected argument(s): {', '.join(sorted(unknown))} (the image settings are "
                f"{', '.join(self.SETTINGS)})"
            )
        s = self.to_dict()
        s.update({k: v for k, v in overrides.items() if v is not None})
        s["size"] = _size_hw(s["size"])
        s["resample"] = _resample(s["resample"])
        for key, default in PAN_AND_SCAN_DEFAULTS.items():
            if s[key] is None:
                s[key] = default
        return s

    def __call__(
        self, images, *, return_tensors=None, input_data_format=None, **overrides
    ) -> ProcessorOutput:
        """``{"pixel_values", "num_crops"}`` for one image or a (nested) list of them.

        ``return_tensors`` None gives a list of (3, H, W) float32 arrays (as transformers), "np"
        one (N, 3, H, W) array, "pt" a torch tensor. Settings can be overridden per call."""
        _check_return_tensors(return_tensors)
        _check_format(input_data_format)
        s = self._settings(overrides)
        flat = _flatten(_fetch(images))
        pixel_values, num_crops = [], []
        for image in flat:
            chw = _to_chw(image, s["do_convert_rgb"], input_data_format)
            crops = []
            if s["do_pan_and_scan"]:
                crops = _pan_and_scan(
                    chw,
                    s["pan_and_scan_min_crop_size"],
                    s["pan_and_scan_max_num_crops"],
                    s["pan_and_scan_min_ratio_to_activate"],
                )
            num_crops.append(len(crops))
            for img in [chw, *crops]:
                if s["do_resize"]:
                    img = _resize(img, *s["size"], s["resample"])
                if s["do_rescale"]:
                    img = _rescale(img, s["rescale_factor"])
                if s["do_normalize"]:
                    img = _normalize(img, s["image_mean"], s["image_std"])
                pixel_values.append(img)
        return ProcessorOutput(
            pixel_values=_convert(pixel_values, return_tensors, "pixel_values"),
            num_crops=_convert(num_crops, return_tensors, "num_crops"),
        )

    preprocess = __call__


def _mean_std(v):
    """A per-channel tuple, or one float for every channel."""
    return tuple(float(x) for x in v) if isinstance(v, (list, tuple, np.ndarray)) else float(v)


# ----------------------------------------------------------------------------- processor


def _read_json(path):
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        try:
            return json.load(f)
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None


def _token_string(config: dict, key: str, default: str) -> str:
    v = config.get(key) or default
    return v.get("content", default) if isinstance(v, dict) else v


class Gemma3Processor:
    """Gemma 3's multimodal processor (transformers' ``Gemma3Processor``, PIL image backend).

    ``tokenizer`` is a :class:`gemma3.tokenizer.Gemma3Tokenizer` (or a directory to load one
    from); it must have ``<start_of_image>``, ``<end_of_image>`` and ``<image_soft_token>`` as
    single tokens. Give either ``image_processor`` or the image settings (``image_size`` and any
    :class:`Gemma3ImageProcessor` argument). ``padding_side`` defaults to the tokenizer config's,
    else "left" (Gemma's tokenizer class default)."""

    model_input_names = ["input_ids", "attention_mask", "token_type_ids", "pixel_values"]

    def __init__(
        self,
        tokenizer,
        image_processor: Gemma3ImageProcessor | None = None,
        *,
        image_size=None,
        mm_tokens_per_image: int = DEFAULT_MM_TOKENS_PER_IMAGE,
        padding_side: str | None = None,
        chat_template: str | None = None,
        **image_settings,
    ):
        if isinstance(tokenizer, (str, os.PathLike)):
            from .tokenizer import Gemma3Tokenizer

            tokenizer = Gemma3Tokenizer(tokenizer)
        self.tokenizer = tokenizer
        if image_processor is None:
            image_processor = Gemma3ImageProcessor(size=image_size, **image_settings)
        elif image_size is not None or image_settings:
            raise ValueError("give either an image_processor or image settings (image_size, ...), not both")
        self.image_processor = image_processor
        n = mm_tokens_per_image
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"mm_tokens_per_image must be a positive integer, got {n!r}")
        self.image_seq_length = self.mm_tokens_per_image = int(n)
        config = getattr(tokenizer, "config", {}) or {}
        self.boi_token = _token_string(config, "boi_token", BOI_TOKEN)
        self.eoi_token = _token_string(config, "eoi_token", EOI_TOKEN)
        self.image_token = _token_string(config, "image_token", IMAGE_TOKEN)
        self.boi_token_id = self._token_id(self.boi_token, "the start of an image")
        self.eoi_token_id = self._token_id(self.eoi_token, "the end of an image")
        self.image_token_id = self._token_id(self.image_token, "an image soft token")
        self.full_image_sequence = (
            f"\n\n{self.boi_token}{self.image_token * self.image_seq_length}{self.eoi_token}\n\n"
        )
        side = padding_side or config.get("padding_side") or "left"
        self.padding_side = self._check_side(side)
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)

    def __repr__(self) -> str:
        size = self.image_processor.size
        return (
            f"Gemma3Processor(image_size=({size['height']}, {size['width']}), "
            f"mm_tokens_per_image={self.mm_tokens_per_image}, padding_side={self.padding_side!r})"
        )

    def _token_id(self, token: str, role: str) -> int:
        ids = self.tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1 or self.tokenizer.convert_ids_to_tokens(ids)[0] != token:
            where = getattr(self.tokenizer, "directory", "the tokenizer")
            raise ValueError(
                f"{where}: the tokenizer has no special token {token!r} ({role}; it encodes as "
                f"{len(ids)} tokens {ids}); Gemma 3's image processing needs {BOI_TOKEN!r}, "
                f"{EOI_TOKEN!r} and {IMAGE_TOKEN!r} in the tokenizer"
            )
        return int(ids[0])

    @staticmethod
    def _check_side(side):
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        return side

    @classmethod
    def from_pretrained(cls, directory, **kwargs) -> Gemma3Processor:
        """From a model directory: the tokenizer, ``processor_config.json`` (transformers 5's
        layout, with an ``image_processor`` section) or ``preprocessor_config.json``, and as a
        fallback ``config.json`` (``vision_config.image_size``, ``mm_tokens_per_image``).
        Keyword arguments override what the files say."""
        from .tokenizer import Gemma3Tokenizer

        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise ValueError(f"{directory}: not a directory")
        processor_cfg = _read_json(os.path.join(directory, "processor_config.json"))
        preprocessor_cfg = _read_json(os.path.join(directory, "preprocessor_config.json"))
        model_cfg = _read_json(os.path.join(directory, "config.json"))
        image_cfg = processor_cfg.get("image_processor")
        if not isinstance(image_cfg, dict):
            image_cfg = preprocessor_cfg
        settings = {k: v for k, v in image_cfg.items() if k in Gemma3ImageProcessor.SETTINGS}
        vision = model_cfg.get("vision_config") or {}
        if settings.get("size") is None and vision.get("image_size") is not None:
            settings["size"] = vision["image_size"]
        seq_len = next(
            (
                c[k]
                for c, k in (
                    (processor_cfg, "image_seq_length"),
                    (preprocessor_cfg, "image_seq_length"),
                    (model_cfg, "mm_tokens_per_image"),
                )
                if c.get(k) is not None
            ),
            DEFAULT_MM_TOKENS_PER_IMAGE,
        )
        chat_template = None
        if not os.path.exists(os.path.join(directory, "chat_template.jinja")):  # the tokenizer reads that
            chat_template = (
                _read_json(os.path.join(directory, "chat_template.json")).get("chat_template")
                or processor_cfg.get("chat_template")
                or None
            )
        if "image_size" in kwargs:
            settings["size"] = kwargs.pop("image_size")
        if "image_processor" not in kwargs:
            for key in Gemma3ImageProcessor.SETTINGS:
                if key in kwargs:
                    settings[key] = kwargs.pop(key)
            kwargs["image_processor"] = Gemma3ImageProcessor.from_dict(settings)
        kwargs.setdefault("mm_tokens_per_image", seq_len)
        kwargs.setdefault("chat_template", chat_template)
        return cls(Gemma3Tokenizer(directory), **kwargs)

    # ------------------------------------------------------------------------- __call__

    def __call__(
        self,
        images=None,
        text=None,
        *,
        padding: bool | str = True,
        padding_side: str | None = None,
        max_length: int | None = None,
        add_special_tokens: bool = True,
        return_tensors: str | None = None,
        do_pan_and_scan: bool = False,
        pan_and_scan_min_crop_size: int = PAN_AND_SCAN_DEFAULTS["pan_and_scan_min_crop_size"],
        pan_and_scan_max_num_crops: int = PAN_AND_SCAN_DEFAULTS["pan_and_scan_max_num_crops"],
        pan_and_scan_min_ratio_to_activate: float = PAN_AND_SCAN_DEFAULTS[
            "pan_and_scan_min_ratio_to_activate"
        ],
        input_data_format: str | None = None,
        **image_settings,
    ) -> ProcessorOutput:
        """Token ids (``input_ids``, ``attention_mask``, ``token_type_ids``) and ``pixel_values``.

        ``text`` is a string or a list of strings, each with one ``<start_of_image>`` per image;
        ``images`` is one image, a list of images (one text) or one list of images per text. With
        images and no text, the text is the markers alone. ``padding``: True/"longest" (default),
        "max_length" (with ``max_length``) or False. ``return_tensors``: None (lists, as
        transformers), "np" or "pt"."""
        _check_return_tensors(return_tensors)
        side = self._check_side(padding_side or self.padding_side)
        texts = self._texts(text)
        nested = None
        if images is not None:
            try:
                nested = _nest(_fetch(images))
            except ValueError as e:
                if text is None and isinstance(images, str):
                    raise ValueError(f"{e} (text goes in text=..., the first argument is images)") from None
                raise
            if not any(nested):
                nested = None
        if texts is None:
            if nested is None:
                raise ValueError("Gemma3Processor needs text, images or both")
            texts = [" ".join([self.boi_token] * len(x)) for x in nested]
        self._check_counts(texts, nested)

        out = ProcessorOutput()
        replacements = []
        if nested is not None:
            processed = self.image_processor(
                [i for x in nested for i in x],
                input_data_format=input_data_format,
                do_pan_and_scan=do_pan_and_scan,
                pan_and_scan_min_crop_size=pan_and_scan_min_crop_size,
                pan_and_scan_max_num_crops=pan_and_scan_max_num_crops,
                pan_and_scan_min_ratio_to_activate=pan_and_scan_min_ratio_to_activate,
                **image_settings,
            )
            replacements = [self._replacement(n) for n in processed["num_crops"]]
            pixel_values = processed["pixel_values"]
        elif image_settings:
            self.image_processor._settings(image_settings)  # unknown names raise as with images
        expanded, k = [], 0
        for t in texts:
            pieces = t.split(self.boi_token)
            parts = [pieces[0]]
            for piece in pieces[1:]:
                parts += [replacements[k], piece]
                k += 1
            expanded.append("".join(parts))

        ids = [self.tokenizer.encode(t, add_special_tokens=add_special_tokens) for t in expanded]
        ids, mask = self._pad(ids, padding, max_length, side)
        type_ids = [[int(i == self.image_token_id) for i in row] for row in ids]
        out["input_ids"] = _convert(ids, return_tensors, "input_ids")
        out["attention_mask"] = _convert(mask, return_tensors, "attention_mask")
        out["token_type_ids"] = _convert(type_ids, return_tensors, "token_type_ids")
        if nested is not None:
            out["pixel_values"] = _convert(pixel_values, return_tensors, "pixel_values")
        return out

    def _replacement(self, num_crops: int) -> str:
        if not num_crops:
            return self.full_image_sequence
        return (
            f"Here is the original image {self.full_image_sequence} and here are some crops to help "
            "you see better " + " ".join([self.full_image_sequence] * num_crops)
        )

    @staticmethod
    def _texts(text):
        if text is None:
            return None
        if isinstance(text, str):
            return [text]
        if isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
            if not text:
                raise ValueError("text is an empty list")
            return list(text)
        raise TypeError("text must be a string or a list of strings")

    def _check_counts(self, texts, nested):
        marker = self.boi_token
        counts = [t.count(marker) for t in texts]
        if nested is None:
            bad = [(i, c) for i, c in enumerate(counts) if c]
            if bad:
                i, c = bad[0]
                raise ValueError(
                    f"text {i} has {c} {marker} marker(s) but no images were given "
                    f"(markers per text: {counts})"
                )
            return
        given = [len(x) for x in nested]
        if len(nested) != len(texts):
            raise ValueError(
                f"images were given for {len(nested)} text(s) ({given} image(s) each) but there are "
                f"{len(texts)} texts with {counts} {marker} marker(s); for a batch of texts pass one "
                "list of images per text"
            )
        for i, (c, g) in enumerate(zip(counts, given)):
            if c != g:
                raise ValueError(
                    f"text {i} has {c} {marker} marker(s) but {g} image(s) were given for it "
                    f"(markers per text: {counts}, images per text: {given}); put one {marker} "
                    "where each image goes"
                )

    def _pad(self, ids, padding, max_length, side):
        if padding in (True, "longest"):
            width = max(len(x) for x in ids)
        elif padding == "max_length":
            if not isinstance(max_length, int) or max_length < 1:
                raise ValueError(f"padding='max_length' needs a positive max_length, got {max_length!r}")
            width = max_length
        elif padding in (False, "do_not_pad"):
            width = 0
        else:
            raise ValueError(f"padding must be True, 'longest', 'max_length' or False, got {padding!r}")
        pad = self.tokenizer.pad_token_id
        pad = 0 if pad is None else pad
        out_ids, out_mask = [], []
        for x in ids:
            n = max(0, width - len(x))
            if side == "left":
                out_ids.append([pad] * n + x)
                out_mask.append([0] * n + [1] * len(x))
            else:
                out_ids.append(x + [pad] * n)
                out_mask.append([1] * len(x) + [0] * n)
        return out_ids, out_mask

    # ------------------------------------------------------------------------- text helpers

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(_ids(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def apply_chat_template(
        self,
        conversation,
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors: str | None = None,
        chat_template: str | None = None,
        **processor_kwargs,
    ):
        """Render a conversation (or a list of them) with the chat template, as transformers'
        processor does: ``{"type": "image"}`` parts become ``<start_of_image>``. With
        ``tokenize=True`` the images named in those parts (``"image"``: a PIL image or array,
        ``"path"`` / ``"url"``: a local file) are processed too; ``return_dict=True`` gives the
        whole processor output, else ``input_ids``."""
        if not callable(getattr(self.tokenizer, "apply_chat_template", None)):
            raise ValueError("the tokenizer has no apply_chat_template")
        batched = isinstance(conversation, (list, tuple)) and bool(conversation)
        batched = batched and isinstance(conversation[0], (list, tuple))
        conversations = list(conversation) if batched else [conversation]
        template = chat_template or self.chat_template
        tok = self.tokenizer
        if template and template != getattr(tok, "chat_template", None):
            tok = copy.copy(tok)
            tok.chat_template = template
        prompts = [
            tok.apply_chat_template(list(c), add_generation_prompt=add_generation_prompt, tokenize=False)
            for c in conversations
        ]
        if not tokenize:
            return prompts if batched else prompts[0]
        images = [_chat_images(c) for c in conversations]
        bos = getattr(self.tokenizer, "bos_token", None)
        if bos and prompts[0].startswith(bos):
            processor_kwargs.setdefault("add_special_tokens", False)
        out = self(
            images=images if any(images) else None,
            text=prompts,
            return_tensors=return_tensors,
            **processor_kwargs,
        )
        return out if return_dict else out["input_ids"]


def _chat_images(conversation) -> list:
    images = []
    for message in conversation:
        content = message.get("content") or []
        if isinstance(content, str):
            continue
        for block in content:
            if block.get("type") == "image":
                images.extend(block[k] for k in ("image", "url", "path", "base64") if k in block)
    return images


def _ids(ids) -> list[int]:
    if _is_torch(ids):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"decode takes one sequence of ids, got shape {arr.shape}")
    return [int(i) for i in arr]


__all__ = ["Gemma3ImageProcessor", "Gemma3Processor", "ProcessorOutput", "infer_channel_format", "load_image"]
