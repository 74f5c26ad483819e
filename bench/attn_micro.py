"""Micro-benchmark of CPU attention variants used to choose the torch backend's kernels."""

import time

import torch
import torch.nn.functional as F


def bench(f, n=5):
    f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n * 1e3


dt = torch.bfloat16
B, Hq, Hkv, D, NBLK, bs = 64, 9, 3, 64, 3000, 16
G = Hq // Hkv
kv = torch.randn(NBLK, 30, 2, bs, Hkv, D, dtype=dt)
kc, vc = kv[:, 5, 0], kv[:, 5, 1]
K = 544
tables = torch.randint(0, NBLK, (B, K // bs))
q = torch.randn(B, Hq, D, dtype=dt)
pad = torch.arange(K)[None, :] >= torch.randint(32, K, (B,))[:, None]


def decode_head_major():
    kg = kc.permute(2, 0, 1, 3)[:, tables].reshape(Hkv * B, K, D)
    vg = vc.permute(2, 0, 1, 3)[:, tables].reshape(Hkv * B, K, D)
    qh = q.view(B, Hkv, G, D).transpose(0, 1).reshape(Hkv * B, G, D)
    s = torch.bmm(qh, kg.transpose(1, 2)).float() * D**-0.5
    s = s.view(Hkv, B, G, K).masked_fill_(pad[None, :, None, :], float("-inf"))
    p = s.softmax(-1).to(dt).view(Hkv * B, G, K)
    return torch.bmm(p, vg).view(Hkv, B, G, D).transpose(0, 1).reshape(B, Hq, D)


def decode_current():
    keys = kc[tables].view(B, K, Hkv, D)
    values = vc[tables].view(B, K, Hkv, D)
    qg = q.view(B, Hkv, G, D)
    scores = q.new_empty(B, Hkv, G, K)
    for h in range(Hkv):
        torch.bmm(qg[:, h], keys[:, :, h].transpose(1, 2), out=scores[:, h])
    probs = (scores.float() * D**-0.5).masked_fill_(pad.view(B, 1, 1, K), float("-inf"))
    probs = probs.softmax(-1).to(dt)
    out = q.new_empty(B, Hkv, G, D)
    for h in range(Hkv):
        torch.bmm(probs[:, h], values[:, :, h], out=out[:, h])
    return out.view(B, Hq, D)


print("decode current    ", bench(decode_current))
print("decode head-major ", bench(decode_head_major))
torch.testing.assert_close(
    decode_current().float(), decode_head_major().float(), rtol=3e-2, atol=3e-2
)

# prefill: 6 prompts of mixed lengths, no context
lens = [480, 300, 120, 60, 512, 200]
Bp, Qm = len(lens), max(lens)
qp = torch.randn(Bp, Hq, Qm, D, dtype=dt)
kp = torch.randn(Bp, Hkv, Qm, D, dtype=dt)
vp = torch.randn(Bp, Hkv, Qm, D, dtype=dt)
rows = torch.arange(Qm)
lim = torch.minimum(rows[None, :], torch.tensor(lens)[:, None] - 1)
mask = (torch.arange(Qm)[None, None, :] <= lim[:, :, None]).unsqueeze(1)
print(
    "prefill sdpa mask ",
    bench(lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, enable_gqa=True)),
)


def per_seq():
    return [
        F.scaled_dot_product_attention(
            qp[i : i + 1, :, :n],
            kp[i : i + 1, :, :n],
            vp[i : i + 1, :, :n],
            is_causal=True,
            enable_gqa=True,
        )
        for i, n in enumerate(lens)
    ]


print("prefill per-seq causal", bench(per_seq))


def manual():
    qh = qp.view(Bp, Hkv, G * Qm, D)
    s = torch.matmul(qh, kp.transpose(-1, -2)).float() * D**-0.5  # [Bp, Hkv, G*Qm, Qm]
    s = s.view(Bp, Hkv, G, Qm, Qm).masked_fill_(~mask.view(Bp, 1, 1, Qm, Qm), float("-inf"))
    p = s.softmax(-1).to(dt).view(Bp, Hkv, G * Qm, Qm)
    return torch.matmul(p, vp)


print("prefill manual bmm", bench(manual))

# Block-diagonal trick: keys stay [B, K, Hkv*D] exactly as one index_select copies them out of the
# pool; the query becomes a block-diagonal [Hkv*D, Hq] matrix so one bmm scores every head.
eye = torch.eye(Hkv, dtype=dt)


def decode_blockdiag():
    flat = tables.flatten()
    keys = torch.index_select(kc, 0, flat).view(B, K, Hkv * D)
    values = torch.index_select(vc, 0, flat).view(B, K, Hkv * D)
    qg = q.view(B, Hkv, G, D)
    # qbd[b, h*D + d, h*G + g] = q[b, h, g, d]
    qbd = torch.einsum("bhgd,hk->bhdkg", qg, eye).reshape(B, Hkv * D, Hkv * G)
    s = torch.bmm(keys, qbd).float() * D**-0.5  # [B, K, Hq]
    s.masked_fill_(pad[:, :, None], float("-inf"))
    p = s.softmax(1).to(dt)
    o = torch.bmm(p.transpose(1, 2), values)  # [B, Hq, Hkv*D]
    o = o.view(B, Hkv, G, Hkv, D)
    return torch.diagonal(o, dim1=1, dim2=3).permute(0, 3, 1, 2).reshape(B, Hq, D)


print("decode block-diag ", bench(decode_blockdiag))
torch.testing.assert_close(
    decode_current().float(), decode_blockdiag().float(), rtol=3e-2, atol=3e-2
)


def decode_blockdiag_t():
    flat = tables.flatten()
    keys = torch.index_select(kc, 0, flat).view(B, K, Hkv * D)
    values = torch.index_select(vc, 0, flat).view(B, K, Hkv * D)
    # qbd[b, h*G + g, h*D + d] = q[b, h, g, d]: one bmm scores every head against all keys
    qbd = torch.einsum("bhgd,hk->bhgkd", q.view(B, Hkv, G, D), eye).reshape(B, Hq, Hkv * D)
    s = torch.bmm(qbd, keys.transpose(1, 2)).float() * D**-0.5  # [B, Hq, K]
    s.masked_fill_(pad[:, None, :], float("-inf"))
    p = s.softmax(-1).to(dt)
    o = torch.bmm(p, values).view(B, Hkv, G, Hkv, D)  # [B, Hq, Hkv*D], keep the diagonal
    return torch.diagonal(o, dim1=1, dim2=3).permute(0, 3, 1, 2).reshape(B, Hq, D)


print("decode block-diag-t", bench(decode_blockdiag_t))
torch.testing.assert_close(
    decode_current().float(), decode_blockdiag_t().float(), rtol=3e-2, atol=3e-2
)
flat = tables.flatten()
keys = torch.index_select(kc, 0, flat).view(B, K, Hkv * D)
qbd = torch.einsum("bhgd,hk->bhgkd", q.view(B, Hkv, G, D), eye).reshape(B, Hq, Hkv * D)
print(
    " parts: index_select x2",
    bench(lambda: (torch.index_select(kc, 0, flat), torch.index_select(vc, 0, flat))),
    "bmm1",
    bench(lambda: torch.bmm(qbd, keys.transpose(1, 2))),
    "qbd",
    bench(
        lambda: torch.einsum("bhgd,hk->bhgkd", q.view(B, Hkv, G, D), eye).reshape(B, Hq, Hkv * D)
    ),
)
print(
    "prefill padded is_causal",
    bench(lambda: F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True)),
)
kp_rep = kp.repeat_interleave(G, dim=1)
vp_rep = vp.repeat_interleave(G, dim=1)
print(
    "prefill padded is_causal, heads repeated",
    bench(lambda: F.scaled_dot_product_attention(qp, kp_rep, vp_rep, is_causal=True)),
)
print(
    "prefill sdpa mask, heads repeated",
    bench(lambda: F.scaled_dot_product_attention(qp, kp_rep, vp_rep, attn_mask=mask)),
)
fmask = torch.zeros(mask.shape, dtype=dt).masked_fill_(~mask, float("-inf"))
print(
    "prefill sdpa float mask",
    bench(lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=fmask, enable_gqa=True)),
)
