"""`edgekv serve` under load, on loopback: concurrent clients over a few distinct conversations, every reply
checked against the same request run alone.

Usage: .venv/bin/python benchmarks/serve_load.py [ARTIFACT_DIR] [--clients 4] [--requests 25]
       [--conversations 8] [--max-tokens 24] [--queue-size 8] [--json PATH]

First each conversation's request is sent alone (one at a time, greedy): its reply is the reference. Then
`clients` threads send `requests` requests each, request j of client c taking conversation (c + j) %
conversations, all at once; every answer must equal its reference, and every refusal be a 503 with
Retry-After. Reports p50/p95 latency, total generated tok/s over the load's wall time, the requests that
reused a cached conversation, and the server's peak RSS against the profile's host budget plus the weights.
Bounded: clients x requests requests of at most max-tokens tokens each.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_common import running_server  # noqa: E402

from edgekv.core.manifest import artifact_dir, read_manifest  # noqa: E402

TOPICS = ("the sea", "mountains", "a city at night", "bread", "a library", "rain", "trains", "a garden",
          "winter", "music", "the moon", "bicycles")


def conversation(index: int) -> list[dict]:
    """A short two-turn conversation of its own (the first reply written here, not generated)."""
    topic = TOPICS[index % len(TOPICS)]
    return [{"role": "user", "content": f"Tell me about {topic}."},
            {"role": "assistant", "content": f"{topic.capitalize()} is a fine subject."},
            {"role": "user", "content": f"Write two sentences about {topic} for a child."}]


def post(url: str, name: str, messages: list[dict], max_tokens: int) -> dict:
    start = time.perf_counter()
    response = httpx.post(f"{url}/v1/chat/completions", timeout=600, json={
        "model": name, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
    result = {"status": response.status_code, "latency_s": time.perf_counter() - start}
    if response.status_code == 200:
        body = response.json()
        result |= {"text": body["choices"][0]["message"]["content"], "tokens": body["usage"]["completion_tokens"],
                   "reused": body["usage"]["prompt_tokens_details"]["cached_tokens"]}
    else:
        result |= {"error": response.json()["error"]["message"], "retry_after": response.headers.get("retry-after")}
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact", nargs="?", type=Path, default=None)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=25)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--queue-size", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    artifact = artifact_dir(args.artifact)
    manifest = read_manifest(artifact)
    weights_mib = sum(f.stat().st_size for f in (artifact / "graphs").rglob("*") if f.is_file()) / 2**20
    host_budget_mib = manifest.profile.host_kv_bytes / 2**20
    with running_server(artifact, "--queue-size", str(args.queue_size)) as server:
        name = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
        alone = [post(server.url, name, conversation(i), args.max_tokens) for i in range(args.conversations)]
        assert all(r["status"] == 200 for r in alone), alone
        print(f"references: {args.conversations} conversations run alone, "
              f"{np.median([r['latency_s'] for r in alone]):.2f} s median", flush=True)
        results: list[dict] = []
        lock = threading.Lock()

        def client(c: int) -> None:
            for j in range(args.requests):
                index = (c + j) % args.conversations
                result = post(server.url, name, conversation(index), args.max_tokens) | {"conversation": index}
                with lock:
                    results.append(result)

        start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
        peak_rss = server.peak_rss_mib()
        metrics = httpx.get(f"{server.url}/metrics").text
    answered = [r for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] == 503 and r["retry_after"]]
    other = [r for r in results if r not in answered and r not in refused]
    wrong = [r for r in answered if r["text"] != alone[r["conversation"]]["text"]]
    latencies = np.array([r["latency_s"] for r in answered])
    summary = {
        "requests": len(results), "answered": len(answered), "refused_503": len(refused), "other": len(other),
        "mismatched": len(wrong), "reused_cache": sum(r["reused"] > 0 for r in answered),
        "p50_latency_s": float(np.percentile(latencies, 50)), "p95_latency_s": float(np.percentile(latencies, 95)),
        "generated_tok_s": sum(r["tokens"] for r in answered) / wall, "wall_s": wall,
        "peak_rss_mib": peak_rss, "weights_mib": weights_mib, "host_budget_mib": host_budget_mib,
        "rss_over_budget_plus_weights": peak_rss / (weights_mib + host_budget_mib)}
    for key, value in summary.items():
        print(f"{key:>30}: {value:.3f}" if isinstance(value, float) else f"{key:>30}: {value}")
    for r in wrong[:3]:
        print(f"mismatch in conversation {r['conversation']}: {r['text']!r} != {alone[r['conversation']]['text']!r}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary,
                                         "alone": alone, "results": results,
                                         "metrics": [line for line in metrics.splitlines() if line.startswith("edgekv_")]},
                                        indent=1))


if __name__ == "__main__":
    main()
