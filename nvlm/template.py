"""The one prompt renderer: chat messages -> text segments tagged by role, plus the images in order.

Each image part renders as the placeholder ``"<image>\\n"`` (as HF ``chat()`` and vLLM do); the processor
later swaps each placeholder for the image's tile-tagged string. Segments keep who wrote each piece of text
so that training can put the loss on assistant text only: a segment's role is the message role for message
content (an assistant segment also holds the ``<|im_end|>`` that closes it, so the model learns to stop) and
``"template"`` for the scaffolding around it.

Two formats (spec section 8):
- ``"nvlm"``: the released NVLM-D ``chat()`` format (``conversation.py`` ``chatml``, MPT separator style):
  ``<|im_start|>system\\n{system}<|im_end|>`` then ``<|im_start|>{role}\\n{content}<|im_end|>`` per turn with
  no newline between turns; default system "Answer the questions.".
- ``"checkpoint"``: the tokenizer's own Jinja ``chat_template`` (Qwen2.5's for NVLM-D), which vLLM uses.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, Literal

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

Format = Literal["nvlm", "checkpoint"]
ROLES = ("system", "user", "assistant")
TEMPLATE = "template"  # the role of scaffolding text
IMAGE_PLACEHOLDER = "<image>"
NVLM_SYSTEM = "Answer the questions."
END_OF_TURN = "<|im_end|>"
# Megatron's qwen2p0 chat format (EVAL_SPEC 1.1), used by eval's nvlm profile and by a model converted from
# Megatron-Core: a newline after every <|im_end|>, unlike the released chat() format (the processor's "nvlm"
# template) that the official profile uses.
MEGATRON_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class PromptError(ValueError):
    """Malformed chat messages, or a prompt whose images do not match its placeholders."""


@dataclass(frozen=True)
class Message:
    """A validated message: content flattened to text with ``<image>\\n`` where its images were."""

    role: str
    content: str
    images: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Rendered:
    segments: list[tuple[str, str]]  # (text, role); role in ROLES or TEMPLATE
    images: list[Any]  # image sources (PIL, path, bytes, URL string) in placeholder order

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.segments)


def image_source(part: dict[str, Any]) -> Any:
    """The image object of an ``image`` / ``image_url`` content part (not loaded here)."""
    if part.get("type") == "image_url":
        url = part.get("image_url")
        src = url.get("url") if isinstance(url, dict) else url
    else:
        src = next((part[k] for k in ("image", "url", "path") if part.get(k) is not None), None)
    if src is None:
        raise PromptError(f"image part {_short(part)} has no image, url or path")
    return src


def parse_messages(messages: Any, reserved: Sequence[str] = ()) -> list[Message]:
    """Validate messages and flatten list contents (text parts joined, images -> ``<image>\\n``).

    No message text may hold a ``reserved`` string (the model's image token): only images become image
    tokens, whatever a user writes."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise PromptError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise PromptError(f"message {i} is a {type(m).__name__}, not a dict")
        role = m.get("role")
        if role not in ROLES:
            raise PromptError(f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        content = m.get("content")
        if isinstance(content, str):
            out.append(Message(role, check_text(content, reserved, f"message {i} ({role})")))
            continue
        if not isinstance(content, (list, tuple)):
            raise PromptError(f"message {i} ({role}) has no content (a string or a list of parts)")
        text, images = [], []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                text.append(check_text(part["text"], reserved, f"message {i} ({role})"))
            elif kind in ("image", "image_url"):
                images.append(image_source(part))
                text.append(IMAGE_PLACEHOLDER + "\n")
            else:
                raise PromptError(f"message {i} ({role}) has an unknown content part {_short(part)}")
        out.append(Message(role, "".join(text), tuple(images)))
    return out


def check_text(text: str, reserved: Sequence[str], where: str = "the text") -> str:
    """``text``, unless it holds a reserved string: then a :class:`PromptError` naming it."""
    for token in reserved:
        if token and token in text:
            raise PromptError(f"{where} contains {token!r}, the model's image token; it may only come from an image")
    return text


def render(
    messages: Any,
    fmt: Format = "nvlm",
    *,
    jinja_template: str | None = None,
    add_generation_prompt: bool = True,
    system: str = NVLM_SYSTEM,
    end_of_turn: str = END_OF_TURN,
    reserved: Sequence[str] = (),
    **jinja_vars: Any,
) -> Rendered:
    """Render a conversation; ``system`` is the ``nvlm`` default (a system message overrides it).

    ``reserved`` strings (the image token) are refused in every message's text, in both formats, and in
    the default ``system`` text."""
    msgs = parse_messages(messages, reserved)
    check_text(system, reserved, "the system prompt")
    images = [im for m in msgs for im in m.images]
    if fmt == "nvlm":
        segments = _render_nvlm(msgs, add_generation_prompt, system, end_of_turn)
    elif fmt == "checkpoint":
        if not jinja_template:
            raise PromptError("the checkpoint's tokenizer_config.json has no chat_template; use the 'nvlm' format")
        text = render_jinja(jinja_template, msgs, add_generation_prompt, **jinja_vars)
        segments = _split_by_content(text, msgs, end_of_turn)
    else:
        raise PromptError(f"unknown prompt format {fmt!r}; expected 'nvlm' or 'checkpoint'")
    return Rendered(_merge(segments), images)


def _render_nvlm(msgs: list[Message], gen: bool, system: str, eot: str) -> list[tuple[str, str]]:
    if msgs[0].role == "system":
        system, msgs = msgs[0].content, msgs[1:]
    segs = [("<|im_start|>system\n", TEMPLATE), (system, "system"), (eot, TEMPLATE)]
    for m in msgs:
        if m.role == "system":
            raise PromptError("the nvlm format allows one system message, and only as the first message")
        segs.append((f"<|im_start|>{m.role}\n", TEMPLATE))
        if m.role == "assistant":
            segs.append((m.content + eot, "assistant"))
        else:
            segs += [(m.content, m.role), (eot, TEMPLATE)]
    if gen:
        segs.append(("<|im_start|>assistant\n", TEMPLATE))
    return segs


def _split_by_content(text: str, msgs: list[Message], eot: str) -> list[tuple[str, str]]:
    """Find each message's content, in order, in a Jinja-rendered prompt; the rest is template text."""
    segs, pos = [], 0
    for m in msgs:
        i = text.find(m.content, pos) if m.content else -1
        if i < 0:  # the template dropped or rewrote it: leave it to the scaffolding
            continue
        end = i + len(m.content)
        if m.role == "assistant" and text.startswith(eot, end):
            end += len(eot)
        segs += [(text[pos:i], TEMPLATE), (text[i:end], m.role)]
        pos = end
    segs.append((text[pos:], TEMPLATE))
    return segs


def _merge(segs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for text, role in segs:
        if not text:
            continue
        if out and out[-1][1] == role:
            out[-1] = (out[-1][0] + text, role)
        else:
            out.append((text, role))
    return out


# ----------------------------------------------------------------------------------------- Jinja


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    """transformers' ``tojson``: plain JSON, not jinja2's HTML-escaped one."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise PromptError(f"chat_template is not valid Jinja: {e}") from None


def render_jinja(source: str, msgs: list[Message], add_generation_prompt: bool = True, **variables: Any) -> str:
    """Render a Jinja chat template the way transformers' ``apply_chat_template`` does."""
    variables.setdefault("tools", None)
    dicts = [{"role": m.role, "content": m.content} for m in msgs]
    try:
        return _compile(source).render(messages=dicts, add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as e:
        raise PromptError(f"chat_template failed: {e}") from None


def _short(x: Any) -> str:
    s = repr(x)
    return s if len(s) <= 80 else s[:77] + "..."
