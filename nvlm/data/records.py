"""Training records from JSONL files, in every accepted form, as chat messages with resolved image paths.

Accepted lines (one JSON object each; image paths relative to the JSONL file):
- ``{"messages": [{"role": ..., "content": str | [{"type": "text", ...}, {"type": "image", "image": path}]}]}``
  (the processor's form; text-only when no image part);
- LLaVA's ``{"image": path | [paths], "conversations": [{"from": "human" | "gpt" | "system", "value": ...}]}``
  with ``<image>`` marking where each image goes (the first human turn gets it when no mark is there);
- pretraining captions ``{"image": path, "caption": ...}`` and VQA ``{"image": path, "question": ..., "answer": ...}``,
  turned into a user/assistant exchange as Megatron's NVLM recipe does (spec section 7.4), the images first
  (a question may hold one ``<image>`` mark per image, LLaVA-style; they are dropped).

A record that cannot be used raises ``RecordError`` whose text is ``"reason: detail"`` (the loader counts the
reason): a line that is not UTF-8 or not a JSON object, an image that is not a path string, ``<image>`` text that
does not match the record's images (in an answer, or in a ``messages`` record, whose images are image parts).
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvlm.template import IMAGE_PLACEHOLDER

CAPTION_PROMPT = "Give a brief description of image."  # Megatron nvlm_prompts.json "CaptioningPretraining"
VQA_PROMPT = "Question: {} Short answer:"  # Megatron's VQA pretraining prompt
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
LITERAL_MARK = f"literal {IMAGE_PLACEHOLDER} text"  # a skip reason


class RecordError(ValueError):
    """A training record that cannot be used; the loader skips it and counts the reason (the text before ':')."""


@dataclass(frozen=True)
class JsonlFile:
    """The non-blank lines of one JSONL file as bytes, decoded and parsed lazily: a bad line (not UTF-8, not
    JSON) fails only when it is used. Lines end at ``\\n``/``\\r`` only, so U+2028 inside a string is kept."""

    path: Path
    lines: tuple[bytes, ...]
    numbers: tuple[int, ...]  # each record's 1-based line number in the file

    @classmethod
    def read(cls, path: str | Path) -> JsonlFile:
        path = Path(path)
        raw = path.read_bytes().removeprefix(codecs.BOM_UTF8).splitlines()
        kept = [(n, line) for n, line in enumerate(raw, start=1) if line.strip()]
        if not kept:
            raise RecordError(f"{path}: no records")
        return cls(path, tuple(line for _, line in kept), tuple(n for n, _ in kept))

    def __len__(self) -> int:
        return len(self.lines)

    def where(self, i: int) -> str:
        """``"FILE line N"`` of record i."""
        return f"{self.path} line {self.numbers[i]}"

    def messages(self, i: int) -> list[dict[str, Any]]:
        """Record i as chat messages, image paths made absolute."""
        try:
            text = self.lines[i].decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecordError(f"not UTF-8: byte {e.start + 1} of the line is {self.lines[i][e.start]:#04x}") from None
        try:
            record = json.loads(text)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, an over-long integer, deep nesting
            raise RecordError(f"malformed JSON: {getattr(e, 'msg', None) or type(e).__name__}") from None
        if not isinstance(record, dict):
            raise RecordError(f"not a JSON object: a {type(record).__name__}")
        return to_messages(record, self.path.parent)


def to_messages(record: dict[str, Any], base: Path) -> list[dict[str, Any]]:
    """One record in any accepted form -> messages with absolute image paths."""
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise RecordError("empty conversation")
        return [_resolve_parts(m, base) for m in msgs]
    parts = [{"type": "image", "image": str(base / p)} for p in _image_paths(record)]
    if "conversations" in record:
        return _llava(record["conversations"], parts)
    if "caption" in record:
        return _exchange(parts, CAPTION_PROMPT, record["caption"])
    if "question" in record and "answer" in record:
        question = record["question"]
        if not isinstance(question, str):
            raise RecordError(f"bad question: a {type(question).__name__}, not a string")
        if question.count(IMAGE_PLACEHOLDER) == len(parts):  # LLaVA-style marks: the images go first anyway
            question = question.replace(IMAGE_PLACEHOLDER, "").strip()
        return _exchange(parts, VQA_PROMPT.format(question), record["answer"])
    raise RecordError("no 'messages', 'conversations', 'caption' or 'question'/'answer' field")


def _image_paths(record: dict[str, Any]) -> list[str]:
    """The record's ``image`` (or ``images``): a path or a list of paths."""
    images = record.get("image") if record.get("image") is not None else record.get("images")
    images = [] if images is None else [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise RecordError(f"bad image field: {_short(images)} is not a path or a list of paths")
    return images


def _resolve_parts(message: Any, base: Path) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise RecordError("a message must be a JSON object")
    content = message.get("content")
    texts = [content] if isinstance(content, str) else []
    if not isinstance(content, list):
        parts = content
    else:
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "image":
                if message.get("role") == "assistant":
                    raise RecordError("image in an answer: only system and user messages may hold images")
                if not isinstance(part.get("image"), str) or not part["image"]:
                    raise RecordError(f"bad image field: {_short(part)} needs 'image': a path")
                part = {**part, "image": str(base / part["image"])}
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
            parts.append(part)
    if any(IMAGE_PLACEHOLDER in t for t in texts):
        raise RecordError(f"{LITERAL_MARK}: a messages record gives its images as image parts")
    return {**message, "content": parts}


def _exchange(images: list[dict[str, Any]], prompt: str, answer: Any) -> list[dict[str, Any]]:
    if not isinstance(answer, str) or not answer.strip():
        raise RecordError("empty answer")
    return _llava([{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}], images)


def _llava(turns: Any, images: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not isinstance(turns, list) or not turns:
        raise RecordError("empty conversation")
    for t in turns:
        if (
            not isinstance(t, dict)
            or not isinstance(t.get("from"), str)
            or t["from"] not in LLAVA_ROLES
            or not isinstance(t.get("value"), str)
        ):
            raise RecordError("a LLaVA turn needs 'from' (human/gpt/system) and a string 'value'")
        if LLAVA_ROLES[t["from"]] == "assistant" and IMAGE_PLACEHOLDER in t["value"]:
            raise RecordError(f"{LITERAL_MARK}: in an answer")
    marks = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns)
    if marks and marks != len(images):
        raise RecordError(f"{LITERAL_MARK}: {marks} {IMAGE_PLACEHOLDER} marks but {len(images)} images")
    out, pending = [], list(images)
    for t in turns:
        role, value = LLAVA_ROLES[t["from"]], t["value"]
        if role == "assistant" or (marks == 0 and not pending):
            out.append({"role": role, "content": value})
            continue
        content: list[dict[str, Any]] = []
        if marks == 0:  # no marks: every image goes before the first user text
            content, pending = pending, []
        pieces = value.split(IMAGE_PLACEHOLDER)
        for k, piece in enumerate(pieces):
            if k:
                content.append(pending.pop(0))
            if piece.strip("\n"):
                content.append({"type": "text", "text": piece.strip("\n")})
        out.append({"role": role, "content": content})
    return out


def _short(x: Any) -> str:
    s = json.dumps(x, default=str)
    return s if len(s) <= 60 else s[:57] + "..."
