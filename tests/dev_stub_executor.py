"""A small, real executor for the dev driver's tests (runs in the child process; no torch).

It validates every batch against the contract, then answers deterministically:
the sampled token of output row o is (token_ids[output_indices[o]] + 1) % VOCAB.
Special tokens make it misbehave on purpose (position of the first such token = parameter):

    SLEEP_TOKEN   sleep `position` milliseconds before answering
    CRASH_TOKEN   os._exit(position) -- the process dies mid-forward, no reply
    ERROR_TOKEN   raise ValueError -- an error for that request only
    GARBAGE_TOKEN write junk bytes into the channel (the `--fd` socket), then answer normally

Startup variants (pass as `--executor dev_stub_executor:NAME`): crash_on_start, raise_on_start,
never_ready.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from pie.drivers.protocol import PROTOCOL_VERSION, Capabilities, ForwardBatch, ForwardResult
from pie.drivers.spec import ExecutorSpec

VOCAB = 1000
SLEEP_TOKEN, CRASH_TOKEN, ERROR_TOKEN, GARBAGE_TOKEN = 900, 901, 902, 903


class StubExecutor:
    def __init__(self, spec: ExecutorSpec, progress: bool = False):
        self.spec = spec
        self.num_pages = spec.num_pages or 64
        self.capabilities = Capabilities(
            protocol_version=PROTOCOL_VERSION,
            architecture="stub",
            num_pages=self.num_pages,
            page_size=spec.page_size,
            vocab_size=VOCAB,
            max_batch_tokens=spec.max_batch_tokens,
            max_batch_size=spec.max_batch_size,
            max_dist_size=spec.max_dist_size,
            device=spec.device,
            dtype=spec.activation_dtype,
            num_layers=1,
            extra={"pid": os.getpid()},
        )
        if progress:
            print(f"stub: loaded {spec.model_path}", file=sys.stderr)

    def _special(self, batch: ForwardBatch, token: int) -> int | None:
        hits = np.flatnonzero(batch.token_ids == token)
        return int(batch.positions[hits[0]]) if hits.size else None

    def execute(self, batch: ForwardBatch) -> ForwardResult:
        batch.validate(self.spec.page_size, self.num_pages, VOCAB)
        if (ms := self._special(batch, SLEEP_TOKEN)) is not None:
            time.sleep(ms / 1000)
        if (code := self._special(batch, CRASH_TOKEN)) is not None:
            print(f"stub: crashing with status {code}", file=sys.stderr, flush=True)
            os._exit(code)
        if self._special(batch, GARBAGE_TOKEN) is not None:
            os.write(int(sys.argv[sys.argv.index("--fd") + 1]), b"\xff" * 16)
        if self._special(batch, ERROR_TOKEN) is not None:
            raise ValueError(f"stub: token {ERROR_TOKEN} is poisonous")
        num_out = batch.num_outputs
        tokens = (batch.token_ids[batch.output_indices] + 1) % VOCAB  # [O] int64
        rows = np.flatnonzero(batch.return_logits)
        logits = np.zeros((rows.size, VOCAB), dtype=np.float32)  # [L, V]: one-hot of the sampled token
        logits[np.arange(rows.size), tokens[rows]] = 1.0
        res = ForwardResult(tokens=tokens.astype(np.int64), logits=logits if rows.size else None)
        if batch.return_logprobs:
            res.logprobs = np.zeros(num_out, dtype=np.float32)
            res.entropies = np.zeros(num_out, dtype=np.float32)
        kmax = int(batch.dist_k.max()) if num_out else 0
        if kmax > 0:
            res.dist_ids = np.full((num_out, kmax), -1, dtype=np.int64)
            res.dist_probs = np.zeros((num_out, kmax), dtype=np.float32)
            res.dist_ids[:, 0], res.dist_probs[:, 0] = tokens, 1.0
        return res


def crash_on_start(spec: ExecutorSpec, progress: bool = False):
    for i in range(60):
        print(f"stub: loading layer {i}", file=sys.stderr)
    print("stub: corrupted shard model-00001.safetensors", file=sys.stderr, flush=True)
    os._exit(3)


def raise_on_start(spec: ExecutorSpec, progress: bool = False):
    raise RuntimeError(f"stub: cannot load weights from {spec.model_path}")


def never_ready(spec: ExecutorSpec, progress: bool = False):
    print("stub: waiting forever", file=sys.stderr, flush=True)
    time.sleep(3600)
