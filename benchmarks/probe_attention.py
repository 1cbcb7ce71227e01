"""Where a trained model's decoder looks when it answers about an image (docs/DEMO.md's D diagnosis).

    python benchmarks/probe_attention.py --model runs/demo/model --heldout runs/demo/data/heldout/read_small.jsonl

For each of ``--n`` held-out records it runs the question with its answer through the model and, at the
position that predicts the answer's first token, reads every decoder head's attention weights: the share
that falls on image tokens, and the entropy of the weights over the image tokens (in nats, beside the
uniform spread's, ``log(number of image tokens)``). A head that reads one tile's text has a low entropy;
one that only averages the image has nearly the uniform one. The weights are recomputed from the same
queries, keys and mask that ``F.scaled_dot_product_attention`` gets (it does not return them).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

import nvlm.models.llm as llm
from nvlm import NVLM, Processor

_sdpa = F.scaled_dot_product_attention
_weights: list[torch.Tensor] = []


def _recording_sdpa(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False):  # same signature as SDPA's use
    if enable_gqa:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    mask = torch.ones(scores.shape[-2:], dtype=torch.bool).tril() if attn_mask is None else attn_mask
    _weights.append(scores.masked_fill(~mask, float("-inf")).softmax(-1))
    return _sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--heldout", required=True, help="a jsonl file of nvlm data synth's held-out records")
    ap.add_argument("--n", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    llm.F = argparse.Namespace(**{**vars(F), "scaled_dot_product_attention": _recording_sdpa})  # type: ignore[assignment]
    model, processor = NVLM.from_pretrained(args.model).eval(), Processor.from_pretrained(args.model)
    heldout = Path(args.heldout)
    rows: dict[int, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for line in heldout.read_text().splitlines()[: args.n]:
        record = json.loads(line)
        messages = [{"role": "user", "content": "<image>\n" + record["question"]},
                    {"role": "assistant", "content": record["answer"]}]  # fmt: skip
        text = processor.render(messages, add_generation_prompt=False).text
        batch = processor(text, [str(heldout.parent / record["image"])])
        _weights.clear()
        with torch.no_grad():
            model(**batch)
        ids = batch["input_ids"][0].tolist()
        answer = list(processor.tokenizer.encode(record["answer"]))
        pos = max(i for i in range(len(ids) - len(answer)) if ids[i + 1 : i + 1 + len(answer)] == answer)
        image = torch.tensor(ids) == model.config.image_token_id
        for layer, w in enumerate(_weights):
            heads = w[0, :, pos]  # (H, T)
            on_image = heads[:, image] / heads[:, image].sum(-1, keepdim=True)
            entropy = -(on_image * on_image.clamp_min(1e-12).log()).sum(-1)
            rows.setdefault(layer, []).append((heads[:, image].sum(-1), entropy, math.log(int(image.sum()))))
    for layer, got in rows.items():
        mass = torch.stack([g[0] for g in got]).mean(0)
        entropy = torch.stack([g[1] for g in got]).mean(0)
        uniform = sum(g[2] for g in got) / len(got)
        print(f"layer {layer}: image share per head {[round(float(x), 2) for x in mass]}, "
              f"entropy over image tokens {[round(float(x), 2) for x in entropy]} (uniform {uniform:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
