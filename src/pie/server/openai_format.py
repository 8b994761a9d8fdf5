"""The JSON shapes of OpenAI's API: whole responses and stream chunks of chat completions, completions
and the Responses API, built from a request's events (see openai_api.Run)."""

from __future__ import annotations

import time
import uuid

from pie.server.openai_params import GenRequest


def _logprobs_chat(tok, tokens: list[int], lps: list[float]) -> dict:
    out = []
    for t, lp in zip(tokens, lps, strict=False):
        s = tok.decode([t])
        out.append({"token": s, "logprob": float(lp), "bytes": list(s.encode()), "top_logprobs": []})
    return {"content": out}


def _logprobs_completion(tok, tokens: list[int], lps: list[float]) -> dict:
    strs = [tok.decode([t]) for t in tokens]
    offsets, pos = [], 0
    for s in strs:
        offsets.append(pos)
        pos += len(s)
    return {
        "tokens": strs,
        "token_logprobs": [float(x) for x in lps],
        "top_logprobs": None,
        "text_offset": offsets,
    }


class _Format:
    done_marker = True

    def __init__(self, req: GenRequest, tok) -> None:
        self.req, self.tok = req, tok
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        total = len(req.prompts) * req.n
        self.texts = [""] * total
        self.done: list[tuple | None] = [None] * total
        self.calls: list[list[dict] | None] = [None] * total  # OpenAI tool_calls of each choice
        self.prompt_tokens = 0

    def _base(self, choices: list) -> dict:
        """The envelope of a streamed chunk (and of a completion): this format's chunk_object."""
        return {
            "id": self.id,
            "object": self.chunk_object,
            "created": self.created,
            "model": self.req.model,
            "choices": choices,
        }

    prefix = "x"

    def add(self, ev: tuple) -> None:
        if ev[0] == "delta":
            self.texts[ev[1]] += ev[2]
        elif ev[0] == "done":
            self.done[ev[1]] = ev
        elif ev[0] == "calls":
            self.calls[ev[1]] = ev[2]
        elif ev[0] == "prompt":
            self.prompt_tokens += ev[1]

    def usage(self) -> dict:
        out = sum(len(d[3]) for d in self.done if d)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": out,
            "total_tokens": self.prompt_tokens + out,
        }

    def start(self) -> list:
        return []

    def end(self) -> list:
        return []


class ChatFormat(_Format):
    prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"

    def final(self) -> dict:
        choices = []
        for i, d in enumerate(self.done):
            lp = _logprobs_chat(self.tok, d[3], d[4]) if self.req.logprobs and d else None
            message: dict = {"role": "assistant", "content": self.texts[i]}
            if self.calls[i]:  # OpenAI: content null beside tool_calls (without the stream's index)
                calls = [{k: v for k, v in c.items() if k != "index"} for c in self.calls[i]]
                message = {"role": "assistant", "content": self.texts[i] or None, "tool_calls": calls}
            choices.append(
                {
                    "index": i,
                    "message": message,
                    "logprobs": lp,
                    "finish_reason": d[2] if d else "stop",
                }
            )
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.req.model,
            "choices": choices,
            "usage": self.usage(),
        }

    def start(self) -> list:
        return [
            self._base(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    for i in range(len(self.texts))
                ]
            )
        ]

    def chunks(self, ev: tuple) -> list:
        self.add(ev)
        if ev[0] == "delta":
            return [
                self._base(
                    [{"index": ev[1], "delta": {"content": ev[2]}, "logprobs": None, "finish_reason": None}]
                )
            ]
        if ev[0] == "calls":
            return [
                self._base(
                    [
                        {
                            "index": ev[1],
                            "delta": {"tool_calls": ev[2]},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
            ]
        if ev[0] == "done":
            lp = _logprobs_chat(self.tok, ev[3], ev[4]) if self.req.logprobs else None
            return [self._base([{"index": ev[1], "delta": {}, "logprobs": lp, "finish_reason": ev[2]}])]
        return []

    def end(self) -> list:
        if not self.req.include_usage:
            return []
        return [self._base([]) | {"usage": self.usage()}]


class CompletionFormat(_Format):
    prefix = "cmpl"
    chunk_object = "text_completion"

    def final(self) -> dict:
        choices = []
        for i, d in enumerate(self.done):
            lp = _logprobs_completion(self.tok, d[3], d[4]) if self.req.logprobs and d else None
            choices.append(
                {"index": i, "text": self.texts[i], "logprobs": lp, "finish_reason": d[2] if d else "stop"}
            )
        return self._base(choices) | {"usage": self.usage()}

    def chunks(self, ev: tuple) -> list:
        self.add(ev)
        if ev[0] == "delta":
            return [self._base([{"index": ev[1], "text": ev[2], "logprobs": None, "finish_reason": None}])]
        if ev[0] == "done":
            lp = _logprobs_completion(self.tok, ev[3], ev[4]) if self.req.logprobs else None
            return [self._base([{"index": ev[1], "text": "", "logprobs": lp, "finish_reason": ev[2]}])]
        return []

    def end(self) -> list:
        return [self._base([]) | {"usage": self.usage()}] if self.req.include_usage else []


class ResponsesFormat(_Format):
    """The Responses API: one message output item with one output_text part."""

    prefix = "resp"
    done_marker = False

    def __init__(self, req: GenRequest, tok) -> None:
        super().__init__(req, tok)
        self.msg_id = f"msg_{uuid.uuid4().hex}"
        self.seq = 0

    def _response(self, status: str) -> dict:
        d = self.done[0]
        text = self.texts[0]
        u = self.usage()
        item = {
            "type": "message",
            "id": self.msg_id,
            "status": "completed" if status == "completed" else "in_progress",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }
        incomplete = status == "completed" and d is not None and d[2] == "length"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "model": self.req.model,
            "status": "incomplete" if incomplete else status,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "output": [item] if status == "completed" else [],
            "error": None,
            "instructions": None,
            "parallel_tool_calls": False,
            "tool_choice": "auto",
            "tools": [],
            "temperature": self.req.temperature,
            "top_p": self.req.top_p,
            "max_output_tokens": self.req.max_tokens,
            "metadata": {},
            "usage": {
                "input_tokens": u["prompt_tokens"],
                "output_tokens": u["completion_tokens"],
                "total_tokens": u["total_tokens"],
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0},
            }
            if status == "completed"
            else None,
        }

    def final(self) -> dict:
        return self._response("completed")

    def _ev(self, kind: str, **fields) -> dict:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **fields}

    def start(self) -> list:
        item = {
            "type": "message",
            "id": self.msg_id,
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        part = {"type": "output_text", "text": "", "annotations": []}
        return [
            self._ev("response.created", response=self._response("in_progress")),
            self._ev("response.in_progress", response=self._response("in_progress")),
            self._ev("response.output_item.added", output_index=0, item=item),
            self._ev(
                "response.content_part.added", item_id=self.msg_id, output_index=0, content_index=0, part=part
            ),
        ]

    def chunks(self, ev: tuple) -> list:
        self.add(ev)
        if ev[0] == "delta":
            return [
                self._ev(
                    "response.output_text.delta",
                    item_id=self.msg_id,
                    output_index=0,
                    content_index=0,
                    delta=ev[2],
                    logprobs=[],
                )
            ]
        return []

    def end(self) -> list:
        final = self._response("completed")
        part = final["output"][0]["content"][0]
        return [
            self._ev(
                "response.output_text.done",
                item_id=self.msg_id,
                output_index=0,
                content_index=0,
                text=self.texts[0],
                logprobs=[],
            ),
            self._ev(
                "response.content_part.done", item_id=self.msg_id, output_index=0, content_index=0, part=part
            ),
            self._ev("response.output_item.done", output_index=0, item=final["output"][0]),
            self._ev("response.completed", response=final),
        ]
