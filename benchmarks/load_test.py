"""Load test of `padrec serve` on loopback: sequential reference answers first, then N concurrent clients.

    .venv/bin/python benchmarks/load_test.py --run runs/quality/beauty [--url http://127.0.0.1:8000]
        [--clients 8] [--requests 200] [--time-limit 100] [--mix list-ar=4,beam-ar=3,list-sd=3] [--k 10]
        [--threads 1] [--max-batch 1] [--out benchmarks/results/load_test.json]

Without --url it starts `padrec serve --run RUN` itself on a free loopback port (its own process, so clients and
server do not share a GIL; its log goes to $TMPDIR/padrec_load_test_server.log) and stops it at the end; with --url it targets a running server (loopback only), and
--run still supplies the test-split histories. Every request is greedy (temperature 0), so its answer is
deterministic: each concurrent answer must equal the sequential answer of the same request (items exactly,
beam scores within 1e-3; batched float32 beam scores differ from batch-1 ones in the last digits). Bounded: at most
--requests per phase, and no request starts after --time-limit seconds (the sequential phase gets half of it).

Prints one table (per phase: throughput, p50/p99 client latency, errors, wrong answers) and one per request kind
of the concurrent phase, and writes everything to --out as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

from padrec.provenance import machine_description
from padrec.run import Run
from padrec.files import atomic_write_text
from padrec.ui import table
from rich.console import Console

console = Console(highlight=False, width=130)  # the tables are wider than a pipe's default 80 columns

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SERVER_LOG = Path(tempfile.gettempdir()) / "padrec_load_test_server.log"
KINDS = {  # name -> request fields
    "list-ar": {"mode": "list", "decoder": "ar"},
    "beam-ar": {"mode": "beam", "decoder": "ar"},
    "list-sd": {"mode": "list", "decoder": "sd"},
}


def parse_mix(text: str) -> list[tuple[str, int]]:
    mix = []
    for part in filter(None, text.split(",")):
        name, _, weight = part.partition("=")
        if name not in KINDS:
            sys.exit(f"unknown request kind {name!r} in --mix (known: {', '.join(KINDS)})")
        mix.append((name, int(weight or 1)))
    return mix


def plan_requests(run: Run, n: int, mix: list[tuple[str, int]], k: int, draft: str | None, seed: int) -> list[dict]:
    cases = run.dataset.eval_cases("test", max_history=run.info.max_history)
    rng = random.Random(seed)
    rng.shuffle(cases)
    items = run.dataset.items
    kinds = [name for name, w in mix for _ in range(w)]
    plan = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        body = {"history": [items[j].raw_id for j in cases[i % len(cases)].history], "k": k, **KINDS[kind]}
        if kind.endswith("-sd") and draft:
            body["draft"] = draft
        plan.append({"kind": kind, "body": body})
    return plan


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))]  # nearest rank


async def one(client: httpx.AsyncClient, req: dict) -> dict:
    t0 = time.perf_counter()
    try:
        r = await client.post("/recommend", json=req["body"])
        ms = 1000 * (time.perf_counter() - t0)
        if r.status_code != 200:
            return {"kind": req["kind"], "ms": ms, "error": f"HTTP {r.status_code}: {r.text[:200]}"}
        body = r.json()
        return {"kind": req["kind"], "ms": ms, "items": [x["item"] for x in body["items"]],
                "scores": [x.get("score") for x in body["items"]], "server_ms": body["latency_ms"],
                "batch": body.get("batch_size", 1), "tau": body.get("tau")}
    except httpx.HTTPError as e:
        return {"kind": req["kind"], "ms": 1000 * (time.perf_counter() - t0), "error": repr(e)}


async def run_phase(url: str, plan: list[dict], clients: int, deadline: float) -> tuple[list[dict | None], float]:
    """`clients` workers take the next request of `plan` until it is exhausted or the deadline passes."""
    results: list[dict | None] = [None] * len(plan)
    next_index = iter(range(len(plan)))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def worker():
            for i in next_index:
                if time.monotonic() > deadline:
                    return
                results[i] = await one(client, plan[i])

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return results, time.perf_counter() - t0


def same_answer(a: dict, b: dict) -> bool:
    if a["items"] != b["items"]:
        return False
    return all(x is None or abs(x - y) <= 1e-3 for x, y in zip(a["scores"], b["scores"]))


def summary(name: str, clients: int, results: list[dict], seconds: float, wrong: int | None) -> dict:
    ok = [r for r in results if "error" not in r]
    lat = [r["ms"] for r in ok]
    return {"phase": name, "clients": clients, "requests": len(results), "seconds": round(seconds, 2),
            "req/s": round(len(results) / seconds, 1) if seconds else 0.0,
            "p50 ms": round(percentile(lat, 50) or 0, 1), "p99 ms": round(percentile(lat, 99) or 0, 1),
            "errors": len(results) - len(ok), "wrong": "-" if wrong is None else wrong}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: str, threads: int, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "padrec", "serve", "--run", run, "--port", str(port), "--threads", str(threads),
           "--max-batch", str(max_batch)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    # a file, not a pipe: nobody reads a pipe while the test runs, and a full one would stall the server
    with open(SERVER_LOG, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited: {SERVER_LOG.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    sys.exit("the server did not come up within 120 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="run directory (its test split supplies the histories)")
    ap.add_argument("--url", default=None, help="a running server (loopback only); default: start one")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--time-limit", type=float, default=100.0, help="seconds for both phases together")
    ap.add_argument("--mix", default="list-ar=4,beam-ar=3,list-sd=3", help="request kinds with weights")
    ap.add_argument("--draft", default=None, help="draft of the sd requests (default: the server's)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of a server this script starts")
    ap.add_argument("--max-batch", type=int, default=1, help="--max-batch of a server this script starts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "load_test.json"))
    a = ap.parse_args()
    if a.clients < 1 or a.requests < 1 or a.time_limit <= 0:
        sys.exit("--clients, --requests and --time-limit must be positive")

    run = Run(a.run)
    plan = plan_requests(run, a.requests, parse_mix(a.mix), a.k, a.draft, a.seed)
    proc = None
    if a.url:
        if urlparse(a.url).hostname not in LOOPBACK:
            sys.exit(f"--url must be a loopback address ({', '.join(sorted(LOOPBACK))}), got {a.url}")
        url = a.url.rstrip("/")
    else:
        proc, url = start_server(a.run, a.threads, a.max_batch)
    try:
        info = httpx.get(f"{url}/info", timeout=10).json()
        start = time.monotonic()
        asyncio.run(run_phase(url, plan[: min(4, len(plan))], 1, start + 30))  # warm-up (first-call costs)
        seq, seq_s = asyncio.run(run_phase(url, plan, 1, start + a.time_limit / 2))
        done = [i for i, r in enumerate(seq) if r is not None and "error" not in r]
        if not done:
            sys.exit(f"no sequential request succeeded; first answer: {seq[0]}")
        plan_c = [plan[i] for i in done]  # only requests with a reference answer
        conc, conc_s = asyncio.run(run_phase(url, plan_c, a.clients, start + a.time_limit))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    seq_ok = [r for r in seq if r is not None]
    conc_pairs = [(seq[i], r) for i, r in zip(done, conc) if r is not None]
    mismatches = [{"kind": c["kind"], "batch": c["batch"], "history": plan[i]["body"]["history"],
                   "sequential": {"items": s["items"], "scores": s["scores"]},
                   "concurrent": {"items": c["items"], "scores": c["scores"]}}
                  for i, (s, c) in zip(done, conc_pairs) if "error" not in c and not same_answer(s, c)]
    wrong = len(mismatches)
    rows = [summary("sequential", 1, seq_ok, seq_s, None),
            summary("concurrent", a.clients, [c for _, c in conc_pairs], conc_s, wrong)]
    by_kind = []
    for kind in dict(parse_mix(a.mix)):
        cs = [c for _, c in conc_pairs if c["kind"] == kind and "error" not in c]
        ss = [r for r in seq_ok if r["kind"] == kind and "error" not in r]
        if not cs:
            continue
        taus = [c["tau"] for c in cs if c.get("tau") is not None]
        by_kind.append({"kind": kind, "requests": len(cs),
                        "seq p50 ms": round(percentile([r["ms"] for r in ss], 50) or 0, 1),
                        "conc p50 ms": round(percentile([c["ms"] for c in cs], 50), 1),
                        "conc p99 ms": round(percentile([c["ms"] for c in cs], 99), 1),
                        "mean batch": round(statistics.mean(c["batch"] for c in cs), 2),
                        "tau": round(statistics.mean(taus), 2) if taus else "-"})
    title = (f"padrec serve load test: {info['dataset']} ({info['target']['layers']} layers, "
             f"d={info['target']['hidden']}), k={a.k}, mix {a.mix}")
    console.print(table(rows, title=title, floats="{:.1f}"))
    console.print(table(by_kind, title="concurrent phase by request kind (client-side latency)", floats="{:.1f}"))

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps({
        "command": " ".join(["benchmarks/load_test.py"] + sys.argv[1:]),
        "machine": machine_description(), "server": {"url": url, "started_here": proc is not None,
                                                     "threads": a.threads if proc else None, "info": info},
        "config": vars(a), "phases": rows, "by_kind": by_kind,
        "mismatches": mismatches[:20],
        "errors": [r["error"] for r in seq_ok + [c for _, c in conc_pairs] if "error" in r][:20],
    }, indent=2))
    console.print(f"written to {out}")
    if wrong or rows[0]["errors"] or rows[1]["errors"]:
        if proc is not None:
            console.print(f"server log: {SERVER_LOG}")
        sys.exit(1)


if __name__ == "__main__":
    main()
