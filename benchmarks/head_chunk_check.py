"""GPU check of head-chunked attention: the reversible backward against plain autograd of the same model.

fp32 (no autocast): gradients of ``reverse`` against ``store``, relative max error; bf16 autocast: their
cosine similarity. Also that head chunks leave the loss unchanged in fp32. Prints one line per check and
exits non-zero on a failure, so a device script can stop before its long runs.

    python benchmarks/head_chunk_check.py
"""

from __future__ import annotations

import json
import sys

import torch

import revnet_core


def grads(model, ids, policy, autocast):
    model.zero_grad(set_to_none=True)
    model.set_policy(policy)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = model(ids).loss
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten().float() for p in model.parameters()])


def main() -> int:
    torch.manual_seed(0)
    dev = torch.device("cuda")
    cfg = dict(num_layers=2, d_model=1024, num_heads=16, vocab_size=50257, max_seq_len=8192, attn_head_chunk=4)
    model = revnet_core.build("torch", **cfg).to(dev)
    ids = torch.randint(0, 50257, (1, 8192), device=dev)
    rows, ok = [], True
    for autocast in (False, True):
        l_store, g_store = grads(model, ids, "store", autocast)
        l_rev, g_rev = grads(model, ids, "reverse", autocast)
        rel = ((g_rev - g_store).abs().max() / g_store.abs().max()).item()
        cos = torch.nn.functional.cosine_similarity(g_rev, g_store, dim=0).item()
        good = (rel < 1e-4) if not autocast else (cos > 0.999)
        ok &= good and bool(torch.isfinite(g_rev).all())
        rows.append({"autocast": autocast, "loss_store": l_store, "loss_reverse": l_rev, "rel_max_err": rel,
                     "cosine": cos, "ok": good})
    whole = revnet_core.build("torch", **{**cfg, "attn_head_chunk": 16}).to(dev)
    whole.load_state_dict(model.state_dict())
    with torch.no_grad():
        d_loss = abs(whole(ids).loss.item() - model(ids).loss.item())
    ok &= d_loss < 1e-4
    rows.append({"fp32 loss, 4 head chunks vs 1": d_loss})
    for r in rows:
        print(json.dumps(r))
    print("head_chunk_check", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
