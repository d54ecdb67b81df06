#!/usr/bin/env python3
"""moac against llama.cpp on the CPU: the same GGUF, the same prompt tokens, the same
thread count, runs interleaved (moac dense, moac with a plan, llama.cpp, then again),
best of the rounds. Prints prefill tokens/s, decode tokens/s after the prompt, peak
resident memory of each run (its own process), and the ratios. Driven by
scripts/bench-cpu.sh, which builds both; a benchmark, not a test."""

import argparse
import json
import os
import subprocess
import sys
import time


def run_measured(cmd, env=None):
    """Runs cmd in a child and returns (stdout bytes, peak RSS MB) from wait4."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.dup2(w, 1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.execvpe(cmd[0], cmd, env or os.environ)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 1 << 16)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(cmd[:3])} ... failed with status {status}")
    return b"".join(chunks), usage.ru_maxrss / 1024.0


def llamacpp_child(args):
    """One llama.cpp run (in its own process): prefill the tokens, greedy decode."""
    import llama_cpp

    tokens = [int(t) for t in open(args.tokens).read().split(",")]
    llm = llama_cpp.Llama(
        model_path=args.model,
        n_ctx=len(tokens) + args.decode + 16,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_batch=512,
        logits_all=False,
        verbose=False,
    )
    t0 = time.perf_counter()
    llm.eval(tokens)
    prefill = time.perf_counter() - t0
    import numpy as np

    vocab = llm.n_vocab()
    t1 = time.perf_counter()
    for _ in range(args.decode):
        # The last evaluated token's logits (the context keeps only those).
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))
        llm.eval([int(logits.argmax())])
    decode = time.perf_counter() - t1
    print(json.dumps({"prefill_s": prefill, "decode_tokens_per_s": args.decode / decode}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--moac", default="target/release/moac")
    ap.add_argument("--plan", required=True, help="the MoA plan moac runs beside dense")
    ap.add_argument("--text", required=True, help="text the prompts are cut from")
    ap.add_argument("--contexts", default="1024,4096,8000")
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return llamacpp_child(args)

    import llama_cpp

    vocab_only = llama_cpp.Llama(model_path=args.model, vocab_only=True, verbose=False)
    all_tokens = vocab_only.tokenize(open(args.text, "rb").read(), add_bos=False)
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    rows = []
    for ctx in [int(c) for c in args.contexts.split(",")]:
        if len(all_tokens) < ctx:
            sys.exit(f"the text has {len(all_tokens)} tokens, fewer than {ctx}")
        ids = all_tokens[:ctx]
        tok_file = f"target/bench-cpu-tokens-{ctx}.txt"
        with open(tok_file, "w") as f:
            f.write(",".join(str(t) for t in ids))
        best = {}
        for _ in range(args.rounds):
            for name in ["moac dense", "moac plan", "llama.cpp"]:
                if name == "llama.cpp":
                    cmd = [sys.executable, __file__, "--child", "--model", args.model,
                           "--tokens", tok_file, "--decode", str(args.decode),
                           "--threads", str(args.threads), "--plan", "-", "--text", "-"]
                else:
                    attn = ["--dense"] if name == "moac dense" else ["--plan", args.plan]
                    cmd = [args.moac, "generate", "--model", args.model, *attn,
                           "--prompt-tokens", ",".join(str(t) for t in ids),
                           "--max-new-tokens", str(args.decode + 1), "--json"]
                out, rss = run_measured(cmd, env)
                d = json.loads(out.decode().strip().splitlines()[-1])
                r = (ctx / d["prefill_s"], d["decode_tokens_per_s"], rss)
                b = best.get(name)
                best[name] = r if b is None else (max(b[0], r[0]), max(b[1], r[1]), max(b[2], r[2]))
                print(f"{ctx:>6} {name:<11} prefill {r[0]:8.1f} tok/s  decode {r[1]:7.1f} tok/s  peak {rss:7.1f} MB",
                      file=sys.stderr)
        rows.append((ctx, best))
    print(f"threads: {args.threads}; best of {args.rounds} interleaved rounds; decode = {args.decode} greedy steps after the prompt\n")
    print("| prompt | llama.cpp prefill / decode tok/s | moac dense | moac plan | dense/llama.cpp prefill, decode | plan/llama.cpp decode | plan/dense prefill | peak MB llama.cpp / dense / plan |")
    print("|---:|---|---|---|---|---:|---:|---|")
    for ctx, b in rows:
        l, d, p = b["llama.cpp"], b["moac dense"], b["moac plan"]
        print(f"| {ctx} | {l[0]:.0f} / {l[1]:.1f} | {d[0]:.0f} / {d[1]:.1f} | {p[0]:.0f} / {p[1]:.1f} | "
              f"{d[0]/l[0]:.2f}x, {d[1]/l[1]:.2f}x | {p[1]/l[1]:.2f}x | {p[0]/d[0]:.2f}x | "
              f"{l[2]:.0f} / {d[2]:.0f} / {p[2]:.0f} |")


if __name__ == "__main__":
    main()
