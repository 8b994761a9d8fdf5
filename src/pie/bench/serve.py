"""`pie bench serve`: load on an OpenAI-compatible server (pie's or any other), like `vllm bench serve`.

Requests go out at a Poisson rate (--request-rate, inf = all at once) and/or under a concurrency cap
(--max-concurrency); every one streams, so the client sees each chunk:
  TTFT  time from sending to the first content chunk
  ITL   time between content chunks (a chunk is a token on pie and vLLM; the last may hold several)
  TPOT  (latency - TTFT) / (output tokens - 1), per request
Output tokens come from the stream's usage (stream_options.include_usage), else the chunk count.
Throughputs are over the wall time of the whole run. Percentiles are over requests (ITL: over chunks).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field

import numpy as np

WORDS = (
    "the of and to in is that for it as with was on be by this are or at from an have which one not but all "
    "can more about time they some would when what there if so into out up use your how other these new"
).split()


@dataclass
class BenchServeOptions:
    base_url: str
    model: str | None = None
    num_prompts: int = 100
    request_rate: float = float("inf")
    max_concurrency: int | None = None
    input_len: int = 128  # words of a random prompt (about as many tokens for common words)
    output_len: int = 128
    dataset: str = "random"  # random | fixed (the same prompt every time: prefix reuse)
    endpoint: str = "completions"  # completions | chat
    ignore_eos: bool = True  # pie and vLLM honour it; other servers ignore the extra field
    api_key: str = "none"
    seed: int = 0


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def prompts(o: BenchServeOptions) -> list[str]:
    rng = random.Random(o.seed)
    if o.dataset == "fixed":
        text = " ".join(rng.choice(WORDS) for _ in range(o.input_len))
        return [text] * o.num_prompts
    return [" ".join(rng.choice(WORDS) for _ in range(o.input_len)) for _ in range(o.num_prompts)]


async def one_request(client, o: BenchServeOptions, model: str, prompt: str) -> RequestResult:
    extra = {"ignore_eos": True} if o.ignore_eos else {}
    t0 = time.perf_counter()
    last = None
    r = RequestResult(ok=False)
    chunks = 0
    try:
        if o.endpoint == "chat":
            stream = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=o.output_len,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body=extra,
            )
        else:
            stream = await client.completions.create(
                model=model,
                prompt=prompt,
                max_tokens=o.output_len,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body=extra,
            )
        async for chunk in stream:
            if chunk.usage is not None:
                r.output_tokens = chunk.usage.completion_tokens
            if not chunk.choices:
                continue
            c = chunk.choices[0]
            text = c.delta.content if o.endpoint == "chat" else c.text
            if not text:
                continue
            now = time.perf_counter()
            if last is None:
                r.ttft = now - t0
            else:
                r.itl.append(now - last)
            last = now
            chunks += 1
        r.latency = time.perf_counter() - t0
        r.output_tokens = r.output_tokens or chunks
        r.ok = True
    except Exception as e:  # a failed request is counted and reported, not fatal to the run
        r.error = f"{type(e).__name__}: {e}"
    return r


async def run(o: BenchServeOptions) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=o.base_url.rstrip("/"), api_key=o.api_key, max_retries=0, timeout=3600)
    model = o.model or (await client.models.list()).data[0].id
    rng = np.random.default_rng(o.seed)
    limit = asyncio.Semaphore(o.max_concurrency) if o.max_concurrency else None

    async def limited(p: str) -> RequestResult:
        if limit is None:
            return await one_request(client, o, model, p)
        async with limit:
            return await one_request(client, o, model, p)

    tasks = []
    t0 = time.perf_counter()
    for p in prompts(o):
        tasks.append(asyncio.create_task(limited(p)))
        if o.request_rate != float("inf"):
            await asyncio.sleep(float(rng.exponential(1.0 / o.request_rate)))
    results = await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    await client.close()
    return summarize(o, model, results, wall)


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q) * 1000) if xs else float("nan")


def summarize(o: BenchServeOptions, model: str, results: list[RequestResult], wall: float) -> dict:
    good = [r for r in results if r.ok]
    ttft = [r.ttft for r in good]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in good if r.output_tokens > 1]
    itl = [x for r in good for x in r.itl]
    e2e = [r.latency for r in good]
    out_tokens = sum(r.output_tokens for r in good)
    return {
        "options": {
            k: (str(v) if isinstance(v, float) and v == float("inf") else v)
            for k, v in asdict(o).items()
            if k != "api_key"
        },
        "model": model,
        "completed": len(good),
        "failed": len(results) - len(good),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": wall,
        "request_throughput": len(good) / wall,
        "output_token_throughput": out_tokens / wall,
        "total_output_tokens": out_tokens,
        **{
            f"{name}_ms_{stat}": f(xs)
            for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2e", e2e))
            for stat, f in (
                ("mean", lambda v: float(np.mean(v) * 1000) if v else float("nan")),
                ("p50", lambda v: _pct(v, 50)),
                ("p99", lambda v: _pct(v, 99)),
            )
        },
    }


def table(rec: dict) -> str:
    lines = [
        f"model {rec['model']}: {rec['completed']} requests completed, {rec['failed']} failed in {rec['duration_s']:.2f} s",
        f"  request throughput   {rec['request_throughput']:.2f} req/s",
        f"  output throughput    {rec['output_token_throughput']:.1f} tok/s ({rec['total_output_tokens']} tokens)",
    ]
    for name in ("ttft", "tpot", "itl", "e2e"):
        lines.append(
            f"  {name.upper():<5} ms  mean {rec[f'{name}_ms_mean']:9.2f}  p50 {rec[f'{name}_ms_p50']:9.2f}  "
            f"p99 {rec[f'{name}_ms_p99']:9.2f}"
        )
    for e in rec["errors"]:
        lines.append(f"  error: {e}")
    return "\n".join(lines)


def to_json(rec: dict) -> str:
    return json.dumps(rec, indent=1)
