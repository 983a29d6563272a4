"""A small Gemma-style tokenizer built in code: SentencePiece-like BPE with byte fallback."""

import json

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>"]
CORPUS = [
    "The capital of France is Paris.",
    "Hello world! How are you today?",
    "def add(a, b):\n    return a + b\n",
    "Numbers 12345 and 67890, emoji and ideas.",
] * 20


def build_tokenizer(directory, with_template: str | None = None):
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS + byte_tokens, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
    )
    tok.save(str(directory / "tokenizer.json"))
    cfg = {
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if with_template:
        cfg["chat_template"] = with_template
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg))
    return directory
