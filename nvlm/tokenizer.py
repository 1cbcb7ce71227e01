"""The text tokenizer: a thin wrapper over a checkpoint's ``tokenizer.json`` (HF ``tokenizers``).

NVLM-D ships Qwen2.5's byte-level BPE tokenizer (spec section 8). We keep only what prompting and
generation need: ``encode`` never adds BOS/EOS (the processor decides), special tokens written in the text
are recognised, and ``StreamDecoder`` turns generated ids into text deltas without splitting UTF-8 sequences.
``build_tiny_tokenizer`` makes a deterministic Qwen2-shaped tokenizer for tests and the tiny presets.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.decoders import DecodeStream

from nvlm.config import ConfigError, read_json_object


class TokenizerError(ConfigError):
    """Missing or unreadable tokenizer files (the message names the file), or a token the vocabulary lacks."""


def _content(tok: Any) -> str | None:
    """Special tokens are stored either as strings or as serialised ``AddedToken`` dicts."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the few ``tokenizer_config.json`` fields generation needs."""

    def __init__(self, tokenizer: _HFTokenizer, config: dict[str, Any] | None = None) -> None:
        self._tk = tokenizer
        self.config: dict[str, Any] = dict(config or {})

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Read ``tokenizer.json`` and, when present, ``tokenizer_config.json`` / ``special_tokens_map.json``."""
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(f"{path}: no tokenizer.json there")
        try:
            tk = _HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"{file}: cannot be read as a tokenizers file ({e})") from None
        config: dict[str, Any] = {}
        source: dict[str, Path] = {}  # which file set each key
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
            f = path / name
            if f.is_file():
                data = read_json_object(f, TokenizerError)
                config.update(data)
                source.update(dict.fromkeys(data, f))
        for key in ("bos_token", "eos_token", "pad_token"):  # the ones prompting and generation use
            tok = config.get(key)
            content = _content(tok)
            if tok is not None and (not isinstance(content, str) or tk.token_to_id(content) is None):
                raise TokenizerError(f"{source[key]}: {key} {_content(tok)!r} is not a token of {file.name}")
        jinja = path / "chat_template.jinja"  # newer transformers save the template beside the config
        if config.get("chat_template") is None and jinja.is_file():
            try:
                config["chat_template"] = jinja.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise TokenizerError(f"{jinja}: not UTF-8 ({e.reason} at byte {e.start})") from None
        return cls(tk, config)

    # ------------------------------------------------------------------------------------ encode/decode

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; BOS/EOS are never added here (the prompt template carries them)."""
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and each token's (start, end) character span in ``text``."""
        enc = self._tk.encode(text, add_special_tokens=False)
        return enc.ids, list(enc.offsets)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int:
        i = self._tk.token_to_id(token)
        if i is None:
            raise TokenizerError(f"token {token!r} is not in the vocabulary")
        return i

    def id_to_token(self, token_id: int) -> str:
        tok = self._tk.id_to_token(int(token_id))
        if tok is None:
            raise TokenizerError(f"id {token_id} is outside the vocabulary ({self.vocab_size} tokens)")
        return tok

    def _special_id(self, key: str) -> int | None:
        tok = _content(self.config.get(key))
        return None if tok is None else self.token_to_id(tok)

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def add_bos_token(self) -> bool:
        """Whether prompts should start with BOS (Yi/Llama tokenizers; Qwen's says false)."""
        return bool(self.config.get("add_bos_token", False)) and self.bos_token_id is not None

    @property
    def chat_template(self) -> str | None:
        tpl = self.config.get("chat_template")
        if isinstance(tpl, list):  # HF's named-templates form
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            tpl = named.get("default")
        return tpl if isinstance(tpl, str) else None

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> _HFTokenizer:
        return self._tk

    # ------------------------------------------------------------------------------------------- save

    def save(self, path: str | Path) -> None:
        """Write the three files transformers' ``AutoTokenizer`` and vLLM read."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._tk.save(str(path / "tokenizer.json"))
        cfg = dict(self.config)
        added = {
            str(i): {
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }
            for i, t in sorted(self._tk.get_added_tokens_decoder().items())
        }
        cfg["added_tokens_decoder"] = added
        (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        smap: dict[str, Any] = {}
        if cfg.get("additional_special_tokens"):
            smap["additional_special_tokens"] = cfg["additional_special_tokens"]
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            tok = _content(cfg.get(key))
            if tok is not None:
                smap[key] = {
                    "content": tok,
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                }
        (path / "special_tokens_map.json").write_text(json.dumps(smap, indent=2, ensure_ascii=False) + "\n")


class StreamDecoder:
    """Incremental detokenizer: ``feed`` one id, get the newly completed text (``tokenizers``' ``DecodeStream``).

    Byte-level BPE tokens can end inside a UTF-8 sequence (emoji, CJK): such text is held back until the
    following tokens complete it; ``flush`` gives what is still held at the end. ``text`` is everything
    emitted, equal to decoding all the ids at once.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._ids: list[int] = []
        self.text = ""  # everything emitted so far

    def feed(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        delta = self._stream.step(self._tok._tk, int(token_id)) or ""
        self.text += delta
        return delta

    def flush(self) -> str:
        """Whatever is still held back (e.g. a truly invalid byte sequence at the end of generation)."""
        whole = self._tok.decode(self._ids, self._skip)
        delta = whole[len(self.text) :] if whole.startswith(self.text) else ""
        self.text += delta
        return delta


# ------------------------------------------------------------------------------ the tiny tokenizer

# Qwen2.5's added tokens, in its order (ids 151643..151664 there); the last eight are not "special".
QWEN25_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Qwen2.5-Instruct's chat template (tool calls kept, as in the original).
QWEN25_CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- '" + QWEN25_DEFAULT_SYSTEM + "' }}\n"
    "    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'
    'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments '
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\n" + QWEN25_DEFAULT_SYSTEM + "<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    '(message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    "            {{- tool_call.name }}\n"
    '            {{- \'", "arguments": \' }}\n'
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

_TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
What is in this image? Describe the image in detail. The image shows a cat sitting on a red chair.
There are two people walking along the beach at sunset, and the sky is orange and purple.
Answer the questions. Answer the question using a single word or phrase.
Follow the user's instruction and answer questions. You are a helpful assistant.
How many apples are on the table? There are three apples and one banana on the wooden table.
The chart shows that sales increased from 2019 to 2023, with the largest growth in the third quarter.
Read the text in the image: the sign says "Open every day from 9 to 5".
A man is riding a bicycle down a busy street in the city, next to a yellow taxi.
The document is a receipt from a coffee shop; the total is 12.50 dollars.
Which animal is larger, the elephant or the mouse? The elephant is much larger than the mouse.
Please write a short poem about the ocean. The waves roll in, the waves roll out, the water sings.
<Image><tile_1><tile_2><tile_3><tile_4><tile_5><tile_6><tile_global_thumbnail></Image>
<Image><tile_global_thumbnail></Image>
Let me think step by step. First, count the objects. Then compare them. Finally, give the answer.
The model looks at every tile of the picture and at a small thumbnail of the whole picture.
She said: "I'm sure it's here, but we'll see." They've already left, and I'd rather stay.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000; math: 3 + 4 = 7, 12 * 2 = 24.
Good morning! How are you today? I am fine, thank you. Where is the train station?
The dog is brown and white, and it is playing with a ball in the green grass of the park.
"""

TINY_BASE_VOCAB = 489  # so that the added tokens take ids 489..510 and <|vision_pad|> is id 500


def train_tokenizer(lines: Iterable[str], base_vocab: int) -> Tokenizer:
    """A Qwen2-shaped tokenizer trained on ``lines``: byte-level BPE with Qwen2's pre-tokenizer (digits one
    by one), ``base_vocab`` learned tokens, then Qwen2.5's added tokens and chat template.

    ``base_vocab`` must cover the 256 byte tokens; the added tokens take the ids after it (``<|im_end|>`` is
    ``base_vocab + 2``, the image placeholder ``<|vision_pad|>`` is ``base_vocab + 11``).
    """
    tk = _HFTokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=base_vocab,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tk.train_from_iterator(lines, trainer=trainer)
    if tk.get_vocab_size() != base_vocab:
        raise TokenizerError(f"the corpus gave {tk.get_vocab_size()} base tokens, not {base_vocab}: give more text")
    for content, special in QWEN25_ADDED_TOKENS:
        tok = AddedToken(content, lstrip=False, rstrip=False, single_word=False, normalized=False, special=special)
        (tk.add_special_tokens if special else tk.add_tokens)([tok])
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "additional_special_tokens": [c for c, s in QWEN25_ADDED_TOKENS[1:] if s],
        "bos_token": None,
        "chat_template": QWEN25_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    return Tokenizer(tk, config)


def build_tiny_tokenizer() -> Tokenizer:
    """A deterministic ~500-token Qwen2-shaped tokenizer (byte-level BPE, Qwen2.5 added tokens and template).

    Tests and the tiny presets use it in place of the real 151k-token Qwen2.5 tokenizer, which cannot be
    downloaded here. ``<Image>`` and ``<tile_k>`` stay plain text, split by BPE as in the real tokenizer.
    """
    return train_tokenizer(_TINY_CORPUS.splitlines(keepends=True), TINY_BASE_VOCAB)
