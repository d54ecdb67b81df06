#!/usr/bin/env python3
"""Independent reference for moac's cache geometry (MOA semantics, section 2).

Written from the semantics page alone, in Python, sharing no code with the Rust
implementation. It writes tests/fixtures/geometry_reference.json, which the Rust tests
compare `moac inspect --json` against. Re-run after changing the example plans:

    python3 scripts/reference_geometry.py
"""
import json
import math
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLANS = os.path.join(ROOT, "examples", "plans")
CASES = [(4096, 1024), (100, 20), (1000, 37), (3, 0), (8000, 1024), (65000, 536)]
SINK, MIN_CAP, GRAN = 64, 128, 64


def capacity(alpha, beta, n):
    c = int(alpha + beta * n)  # trunc toward zero, like Python int()
    c = min(c, n)
    return math.ceil(max(c, MIN_CAP) / GRAN) * GRAN


def model(cfg):
    hq = cfg["num_attention_heads"]
    hkv = cfg.get("num_key_value_heads", hq)
    d = cfg.get("head_dim", cfg["hidden_size"] // hq)
    return cfg["num_hidden_layers"], hq, hkv, d


def main():
    out = []
    for model_dir in sorted(os.listdir(PLANS)):
        folder = os.path.join(PLANS, model_dir)
        if not os.path.isdir(folder):
            continue
        with open(os.path.join(folder, "config.json")) as f:
            layers, hq, hkv, d = model(json.load(f))
        g = hq // hkv
        for plan_file in sorted(os.listdir(folder)):
            if not plan_file.endswith("alpha_beta.json"):
                continue
            with open(os.path.join(folder, plan_file)) as f:
                plan = json.load(f)
            assert len(plan["alphas"]) == layers
            for p, m in CASES:
                n = p + m
                rows = []
                kv_slots = q_slots = 0
                for a_row, b_row in zip(plan["alphas"], plan["betas"]):
                    qc = [capacity(a, b, n) for a, b in zip(a_row, b_row)]
                    kc = [max(qc[j * g:(j + 1) * g]) for j in range(hkv)]
                    rows.append({"query_capacity": qc, "kv_capacity": kc})
                    kv_slots += sum(kc)
                    q_slots += sum(qc)
                out.append({
                    "plan": f"{model_dir}/{plan_file}",
                    "prompt_len": p,
                    "max_new_tokens": m,
                    "n": n,
                    "layers": rows,
                    "totals": {
                        "kv_bytes": 2 * kv_slots * d * 2,
                        "dense_kv_bytes": 2 * layers * hkv * n * d * 2,
                        "mha_expanded_kv_bytes": 2 * q_slots * d * 2,
                    },
                })
    path = os.path.join(ROOT, "tests", "fixtures", "geometry_reference.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {path}: {len(out)} cases")


if __name__ == "__main__":
    main()
