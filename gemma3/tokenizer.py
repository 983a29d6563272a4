"""The tokenizer (``tokenizer.json`` through the ``tokenizers`` library) and the chat template.

The chat template comes from ``chat_template.jinja`` or ``tokenizer_config.json`` when the
model directory has one, else the Gemma 3 template built in here. It renders with Jinja2 the
way transformers does (trim_blocks, lstrip_blocks, ``raise_exception``).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

# Gemma 3's chat template: <bos><start_of_turn>user\n...<end_of_turn>\n<start_of_turn>model\n
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    '{%- set first_user_prefix = "" -%}'
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}{{ raise_exception('Invalid content type') }}{%- endif -%}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
)


class TokenizerError(ValueError):
    pass


class Gemma3Tokenizer:
    def __init__(self, directory):
        from tokenizers import Tokenizer

        self.directory = os.fspath(directory)
        path = os.path.join(self.directory, "tokenizer.json")
        if not os.path.exists(path):
            raise TokenizerError(f"{self.directory}: no tokenizer.json")
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:  # the tokenizers library raises its own Exception type
            raise TokenizerError(f"{path}: not a tokenizers file ({e})") from None
        cfg_path = os.path.join(self.directory, "tokenizer_config.json")
        self.config = {}
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                self.config = json.load(f)
        self.chat_template = self._template()
        self.bos_token = self._special("bos_token", "<bos>")
        self.eos_token = self._special("eos_token", "<eos>")
        self.pad_token = self._special("pad_token", "<pad>")
        self.bos_token_id = self._tok.token_to_id(self.bos_token)
        self.eos_token_id = self._tok.token_to_id(self.eos_token)
        self.pad_token_id = self._tok.token_to_id(self.pad_token)

    def _special(self, key, default):
        v = self.config.get(key, default)
        return v.get("content", default) if isinstance(v, dict) else (v or default)

    def _template(self) -> str:
        jinja = os.path.join(self.directory, "chat_template.jinja")
        if os.path.exists(jinja):
            with open(jinja) as f:
                return f.read()
        t = self.config.get("chat_template")
        if isinstance(t, list):  # named templates: take the default one
            t = next((x["template"] for x in t if x.get("name") == "default"), None)
        return t or GEMMA3_CHAT_TEMPLATE

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids) -> list[str]:
        return [self._tok.id_to_token(int(i)) for i in ids]

    def __call__(self, texts, *, add_special_tokens: bool = True, padding_side: str = "left"):
        """Encode one text or a batch, left-padded: {"input_ids", "attention_mask"} int64 arrays."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        ids = [self.encode(t, add_special_tokens) for t in batch]
        width = max(len(x) for x in ids)
        input_ids = np.full((len(ids), width), self.pad_token_id or 0, np.int64)
        mask = np.zeros((len(ids), width), np.int64)
        for i, x in enumerate(ids):
            sl = slice(width - len(x), width) if padding_side == "left" else slice(0, len(x))
            input_ids[i, sl] = x
            mask[i, sl] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def apply_chat_template(self, messages, *, add_generation_prompt: bool = True, tokenize: bool = False):
        """Render a conversation ([{"role", "content"}, ...]) as the model expects it."""
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TokenizerError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            template = env.from_string(self.chat_template)
        except jinja2.TemplateSyntaxError as e:
            raise TokenizerError(f"chat template of {self.directory}: {e}") from None
        text = template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )
        # The template already starts with <bos>: do not add it twice when tokenizing.
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def save(self, directory) -> None:
        """Copy the tokenizer files into ``directory`` (the caller makes it atomic)."""
        for name in FILES:
            src = os.path.join(self.directory, name)
            if os.path.exists(src):
                shutil.copyfile(src, os.path.join(directory, name))
