"""A deliberately naive gated cross-attention block (Flamingo's GATED XATTN-DENSE), one query at a time.

Written from the formula, not from nvlm.models.xattn: explicit per-head softmax over the memory keys a
token may read, GQA by head index arithmetic, RMSNorm and SwiGLU spelled out.
"""

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def gated_xattn_block(
    sd: dict, x: torch.Tensor, memory: torch.Tensor, reads: torch.Tensor, heads: int, kv_heads: int, eps: float
) -> torch.Tensor:
    """x (B, T, C), memory (B, M, C), reads (B, T, M) bool -> (B, T, C)."""
    b, t, c = x.shape
    d = c // heads
    out = x.clone()
    for i in range(b):
        k = memory[i] @ sd["attn.k_proj.weight"].T  # (M, Hkv*D)
        v = memory[i] @ sd["attn.v_proj.weight"].T
        for j in range(t):
            keys = reads[i, j].nonzero().flatten()
            if len(keys) == 0:
                continue  # reads nothing: the block leaves the token as it is
            h = x[i, j]
            q = rms_norm(h, sd["attn_norm.weight"], eps) @ sd["attn.q_proj.weight"].T  # (H*D,)
            per_head = []
            for hd in range(heads):
                g = hd // (heads // kv_heads)
                qh = q[hd * d : (hd + 1) * d]
                kh, vh = k[keys, g * d : (g + 1) * d], v[keys, g * d : (g + 1) * d]
                w = torch.softmax(kh @ qh / d**0.5, dim=0)
                per_head.append(w @ vh)
            attn = torch.cat(per_head) @ sd["attn.o_proj.weight"].T
            h = h + torch.tanh(sd["attn_gate"]) * attn
            n = rms_norm(h, sd["ffn_norm.weight"], eps)
            gate, up = n @ sd["ffn.gate_proj.weight"].T, n @ sd["ffn.up_proj.weight"].T
            ffn = (gate * torch.sigmoid(gate) * up) @ sd["ffn.down_proj.weight"].T
            out[i, j] = h + torch.tanh(sd["ffn_gate"]) * ffn
    return out
