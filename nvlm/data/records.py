"""Training records from JSONL files, in every accepted form, as chat messages with resolved image paths.

Accepted lines (one JSON object each; image paths relative to the JSONL file):
- ``{"messages": [{"role": ..., "content": str | [{"type": "text", ...}, {"type": "image", "image": path}]}]}``
  (the processor's form; text-only when no image part);
- LLaVA's ``{"image": path | [paths], "conversations": [{"from": "human" | "gpt" | "system", "value": ...}]}``
  with ``<image>`` marking where each image goes (the first human turn gets it when no mark is there);
- pretraining captions ``{"image": path, "caption": ...}`` and VQA ``{"image": path, "question": ..., "answer": ...}``,
  turned into a user/assistant exchange as Megatron's NVLM recipe does (spec section 7.4).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvlm.template import IMAGE_PLACEHOLDER

CAPTION_PROMPT = "Give a brief description of image."  # Megatron nvlm_prompts.json "CaptioningPretraining"
VQA_PROMPT = "Question: {} Short answer:"  # Megatron's VQA pretraining prompt
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class RecordError(ValueError):
    """A training record that cannot be used; the loader skips it and counts the reason."""


@dataclass(frozen=True)
class JsonlFile:
    """The lines of one JSONL file, parsed lazily (a malformed line fails only when it is used)."""

    path: Path
    lines: tuple[str, ...]

    @classmethod
    def read(cls, path: str | Path) -> "JsonlFile":
        path = Path(path)
        lines = tuple(line for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
        if not lines:
            raise RecordError(f"{path}: no records")
        return cls(path, lines)

    def __len__(self) -> int:
        return len(self.lines)

    def messages(self, i: int) -> list[dict[str, Any]]:
        """Record i as chat messages, image paths made absolute."""
        try:
            record = json.loads(self.lines[i])
        except json.JSONDecodeError as e:
            raise RecordError(f"malformed JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise RecordError("a record must be a JSON object")
        return to_messages(record, self.path.parent)


def to_messages(record: dict[str, Any], base: Path) -> list[dict[str, Any]]:
    """One record in any accepted form -> messages with absolute image paths."""
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise RecordError("empty conversation")
        return [_resolve_parts(m, base) for m in msgs]
    images = record.get("image") or record.get("images") or []
    images = [images] if isinstance(images, str) else list(images)
    parts = [{"type": "image", "image": str(base / p)} for p in images]
    if "conversations" in record:
        return _llava(record["conversations"], parts)
    if "caption" in record:
        return _exchange(parts, CAPTION_PROMPT, record["caption"])
    if "question" in record and "answer" in record:
        return _exchange(parts, VQA_PROMPT.format(record["question"]), record["answer"])
    raise RecordError("no 'messages', 'conversations', 'caption' or 'question'/'answer' field")


def _resolve_parts(message: Any, base: Path) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise RecordError("a message must be a JSON object")
    content = message.get("content")
    if not isinstance(content, list):
        return message
    parts = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "image" and isinstance(part.get("image"), str):
            part = {**part, "image": str(base / part["image"])}
        parts.append(part)
    return {**message, "content": parts}


def _exchange(images: list[dict[str, Any]], prompt: str, answer: Any) -> list[dict[str, Any]]:
    if not isinstance(answer, str) or not answer.strip():
        raise RecordError("empty answer")
    return [{"role": "user", "content": [*images, {"type": "text", "text": prompt}]},
            {"role": "assistant", "content": answer}]  # fmt: skip


def _llava(turns: Any, images: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not isinstance(turns, list) or not turns:
        raise RecordError("empty conversation")
    marks = sum(str(t.get("value", "")).count(IMAGE_PLACEHOLDER) for t in turns if isinstance(t, dict))
    if marks and marks != len(images):
        raise RecordError(f"{marks} {IMAGE_PLACEHOLDER} marks but {len(images)} images")
    out, pending = [], list(images)
    for t in turns:
        if not isinstance(t, dict) or t.get("from") not in LLAVA_ROLES or not isinstance(t.get("value"), str):
            raise RecordError("a LLaVA turn needs 'from' (human/gpt/system) and a string 'value'")
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
