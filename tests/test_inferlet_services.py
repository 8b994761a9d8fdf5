"""Pie's services on pie: runtime.launch, messaging, session (under `pie run`) and scheduling hints."""

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_driver import FakeDriver
from runtime_checks import assert_all_free

from inferlet import Context, Model, Sampler, messaging, runtime, scheduling, session
from inferlet.runtime import ChildError
from pie.inferlets.loader import InferletError
from pie.runtime.engine import Engine
from pie.runtime.sequence import RESIDENT
from pie.runtime.session import SessionError

SRC = Path(__file__).resolve().parents[1] / "src"


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def with_engine(inferlet, input=None, **driver):
    e = Engine.from_drivers({"fake": (FakeDriver(**driver), None)})
    await e.start()
    try:
        out = await e.run_inferlet(inferlet, input or {})
        await asyncio.sleep(0)  # children cancelled at the parent's end unwind
        assert not e.broker.stats()["subscriptions"] and not e.broker.stats()["pullers"]
        assert_all_free(e.model())
        return out
    finally:
        await e.shutdown()


# ---- launch --------------------------------------------------------------------------------------


CALLEE = """
from inferlet import Context, Model

async def main(input):
    ctx = Context(Model.load())
    ctx.append(list(range(1, input["n"] + 1)))
    await ctx.flush()
    return f"callee saw {ctx.seq_len} tokens"
"""


def test_launch_runs_a_file_and_returns_its_result(tmp_path):
    callee = tmp_path / "callee.py"
    callee.write_text(CALLEE)

    async def caller(_):
        a = runtime.launch(str(callee), {"n": 5})
        b = runtime.launch(str(callee), '{"n": 9}')  # Pie passes the input as JSON text
        assert len(a.pid()) == 36 and a.pid() != b.pid()
        return [await a, await b.wait(), a.get()]

    got = run(with_engine(caller))
    assert got == '["callee saw 5 tokens", "callee saw 9 tokens", "callee saw 5 tokens"]'


def test_cancel_frees_the_childs_pages_and_wait_says_cancelled():
    async def child(_):
        ctx = Context(Model.load())
        ctx.append(list(range(40)))
        await ctx.flush()
        messaging.push("ready", str(len(ctx._inner._seq.pages)))
        await messaging.pull("never")  # blocks until cancelled

    async def parent(_):
        rt = Model.load()._pie._rt
        kid = runtime.launch(child)
        pages = int(await messaging.pull("ready"))
        held = [len(s.pages) for s in rt.scheduler.seqs.values()]
        assert pages == 10 and held == [10] and not kid.done()
        with pytest.raises(TimeoutError):  # a timeout around wait() leaves the child running
            await asyncio.wait_for(kid.wait(), 0.05)
        assert not kid.done()
        kid.cancel()
        with pytest.raises(ChildError, match="was cancelled"):
            await kid
        assert not rt.scheduler.seqs  # its context is gone; with_engine checks every page is free
        return "ok"

    assert run(with_engine(parent)) == "ok"


def test_launch_errors_are_clear():
    async def boom(_):
        raise ValueError("bad input")

    async def parent(_):
        with pytest.raises(InferletError, match="runtime.launch\\('no-such-program'\\).*built-in inferlets"):
            runtime.launch("no-such-program")
        with pytest.raises(ValueError, match="not valid JSON"):
            runtime.launch(boom, "{oops")
        with pytest.raises(ChildError, match="failed: ValueError: bad input"):
            await runtime.launch(boom)

        # a child has no client session
        async def talker(_):
            session.send("hi")

        with pytest.raises(ChildError, match="detached from its parent's client session"):
            await runtime.launch(talker)
        return "ok"

    assert run(with_engine(parent)) == "ok"


def test_children_left_running_end_with_their_parent():
    async def sleeper(_):
        ctx = Context(Model.load())
        ctx.append([1, 2, 3, 4, 5])
        await ctx.flush()
        await asyncio.sleep(3600)

    async def parent(_):
        runtime.launch(sleeper)
        await asyncio.sleep(0.05)
        return "done"

    assert run(with_engine(parent)) == "done"  # with_engine checks every page came back


# ---- messaging -----------------------------------------------------------------------------------


def test_push_pull_delivers_in_order_to_the_waiting_puller():
    async def producer(input):
        for i in range(input["n"]):
            messaging.push("jobs", f"job {i}")
            if i % 7 == 0:
                await asyncio.sleep(0)
        return "sent"

    async def consumer(input):
        return [await messaging.pull("jobs") for _ in range(input["n"])]

    async def parent(_):
        c = runtime.launch(consumer, {"n": 50})  # it waits before anything is pushed
        await asyncio.sleep(0.01)
        await runtime.launch(producer, {"n": 50})
        got = await c
        messaging.push("later", "x")
        messaging.push("later", "y")
        return [got, await messaging.pull("later"), await messaging.pull("later")]

    import json

    out = run(with_engine(parent))
    got, x, y = json.loads(out)
    assert json.loads(got) == [f"job {i}" for i in range(50)] and (x, y) == ("x", "y")  # results are text


def test_broadcast_reaches_every_subscriber_in_order_and_subscriptions_close():
    async def listener(input):
        out = []
        sub = messaging.subscribe("news")  # left open on purpose: the engine closes it
        messaging.push("subscribed", input["name"])
        async for m in sub:
            if m == "END":
                break
            out.append(m)
        return out

    async def parent(_):
        kids = [runtime.launch(listener, {"name": n}) for n in ("a", "b")]
        assert {await messaging.pull("subscribed"), await messaging.pull("subscribed")} == {"a", "b"}
        messaging.broadcast("news", "ignored by nobody")
        for i in range(20):
            messaging.broadcast("news", str(i))
        messaging.broadcast("news", "END")
        with messaging.subscribe("late") as late:
            messaging.broadcast("late", "1")
            assert await late.next() == "1"
        assert await late.next() is None  # unsubscribed
        return [await k for k in kids]

    import json

    got = json.loads(run(with_engine(parent)))
    want = ["ignored by nobody", *map(str, range(20))]
    assert [json.loads(g) for g in got] == [want, want]


def test_messaging_rejects_bad_arguments():
    async def bad(_):
        with pytest.raises(TypeError, match="messages are strings"):
            messaging.push("t", {"a": 1})
        with pytest.raises(ValueError, match="non-empty string"):
            messaging.broadcast("", "x")
        return "ok"

    assert run(with_engine(bad)) == "ok"


# ---- scheduling hints ----------------------------------------------------------------------------


def test_bids_and_idle_choose_the_preemption_victim():
    """Two idle contexts hold the cache; a third needs pages: the lower bid loses its pages; idle() makes a
    context the first victim whatever its bid."""

    async def inferlet(input):
        model = Model.load()
        rt = model._pie._rt
        a, b = Context(model), Context(model)
        for c in (a, b):
            c.append(list(range(1, 25)))  # 24 tokens: 6 pages of 4
            await c.flush()
        a.set_bid(input["bid_a"])
        b.set_bid(input["bid_b"])
        assert scheduling.price() == 1.0 and scheduling.dividend(model) == 0.0
        assert scheduling.balance(model) == rt.kv.alloc.num_free
        c = Context(model)
        c.append(list(range(100, 124)))
        with a.idle() if input.get("idle_a") else _nothing():
            await c.flush()  # needs 6 of the 12 pages: one of a, b is preempted
        assert a._inner._seq.priority == input["bid_a"]  # idle() gave the bid back
        lost = [name for name, x in (("a", a), ("b", b)) if x._inner._seq.state != RESIDENT]
        rent = scheduling.rent(c)
        assert scheduling.latency(c) > 0.0
        return f"{','.join(lost)} {rent}"

    big = {"num_pages": 12, "page_size": 4, "num_swap_slots": 0}
    assert run(with_engine(inferlet, {"bid_a": 5.0, "bid_b": 1.0}, **big)) == "b 1.0"
    assert run(with_engine(inferlet, {"bid_a": 1.0, "bid_b": 5.0}, **big)) == "a 1.0"
    assert run(with_engine(inferlet, {"bid_a": 9.0, "bid_b": 0.0, "idle_a": True}, **big)) == "a 0.0"


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return None


def test_suspend_gives_pages_back_and_the_context_resumes_exactly():
    async def inferlet(input):
        model = Model.load()
        rt = model._pie._rt
        ctx = Context(model)
        ctx.append(list(range(1, 30)))
        await ctx.flush()
        if not input["suspend"]:
            f = ctx.forward()
            f.input([30])
            h = f.sample([0], Sampler.argmax())
            return str((await f.execute()).token(h))
        freed = ctx.suspend()
        seq = ctx._inner._seq
        assert freed == 8 and seq.state != RESIDENT and not [p for p in seq.pages if p >= 0]
        assert rt.kv.alloc.num_free + rt.kv.num_cached == rt.kv.alloc.num_pages  # all free or evictable
        with pytest.raises(ValueError, match="a bid is a number >= 0"):
            ctx.set_bid(-1)
        f = ctx.forward()
        f.input([30])
        h = f.sample([0], Sampler.argmax())
        out = await f.execute()
        return str(out.token(h))

    plain = run(with_engine(inferlet, {"suspend": False}, num_pages=32, page_size=4))
    for swap in (0, 32):  # recomputed, then swapped back in: the same next token
        assert (
            run(with_engine(inferlet, {"suspend": True}, num_pages=32, page_size=4, num_swap_slots=swap))
            == plain
        )


# ---- session under `pie run` ---------------------------------------------------------------------


TALKER = """
from inferlet import session

async def main(input):
    session.send("hello ")
    session.send({"n": 1})
    session.send("\\n")
    got = await session.receive()
    second = await session.receive()
    return f"got {got!r} then {second!r}"
"""


def _pie_run(tmp_path, *flags, stdin="line one\nline two\n"):
    f = tmp_path / "talker.py"
    f.write_text(TALKER)
    env = {**os.environ, "PYTHONPATH": str(SRC), "PIE_HOME": str(tmp_path / "home")}
    return subprocess.run(
        [sys.executable, "-m", "pie", "run", "--in-process", *flags, str(f)],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_session_under_pie_run_streams_to_stderr_and_reads_stdin(tmp_path):
    r = _pie_run(tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "got 'line one' then 'line two'\n"
    assert 'hello {"n": 1}\n' in r.stderr


def test_session_stream_flag_sends_to_stdout_before_the_result(tmp_path):
    r = _pie_run(tmp_path, "--stream")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hello {\"n\": 1}\ngot 'line one' then 'line two'\n"
    assert "hello" not in r.stderr
    r = _pie_run(tmp_path, "--stream", stdin="only one\n")  # stdin ends early: a clear error
    assert r.returncode != 0 and "stdin ended" in r.stderr


def test_stdio_session_refuses_a_terminal_and_without_a_session_says_so(monkeypatch):
    import io

    from pie.runtime import session as rt_session

    s = rt_session.StdioSession(io.StringIO(), inp=io.StringIO("piped\n"))
    assert run(s.receive()) == "piped"
    monkeypatch.setattr(rt_session, "_isatty", lambda _stream: True)
    with pytest.raises(SessionError, match="stdin is a terminal; pipe them in"):
        run(s.receive())

    async def lonely(_):
        with pytest.raises(SessionError, match="no client session"):
            await session.receive()
        return "ok"

    assert run(with_engine(lonely)) == "ok"


def test_a_front_end_plugs_in_a_callback_session():
    from pie.runtime.session import CallbackSession

    async def echo(_):
        session.send("ready")
        first = await session.receive()
        blob = await session.receive_file()
        session.send({"got": first, "bytes": len(blob)})
        session.send_file(blob[::-1])
        with pytest.raises(SessionError, match="closed the session"):
            await session.receive()
        return "bye"

    async def drive():
        sent, files = [], []
        s = CallbackSession(sent.append, files.append)
        e = Engine.from_drivers({"fake": (FakeDriver(), None)})
        await e.start()
        try:
            task = e.spawn_inferlet(echo, {}, session=s)
            await asyncio.sleep(0.01)
            s.deliver("hello")
            s.deliver_file(b"abc")
            await asyncio.sleep(0.01)
            s.close()
            return await task, sent, files
        finally:
            await e.shutdown()

    result, sent, files = run(drive())
    assert result == "bye" and sent == ["ready", '{"got": "hello", "bytes": 3}'] and files == [b"cba"]


def test_a_cancelled_pull_loses_no_message_and_leaves_nothing_behind():
    from pie.runtime.messaging import Broker

    async def go():
        b = Broker()
        first = asyncio.create_task(b.pull("t"))
        second = asyncio.create_task(b.pull("t"))
        await asyncio.sleep(0)
        b.push("t", "m1")  # handed to the first puller...
        first.cancel()  # ...which is cancelled before it runs: the message goes back to the queue
        await asyncio.gather(first, return_exceptions=True)
        b.push("t", "m2")
        got = [await second, await b.pull("t")]
        return got, b.stats()

    got, stats = run(go())
    assert got == ["m1", "m2"] and stats == {"queued": 0, "pullers": 0, "subscriptions": 0, "topics": 0}


def test_bids_choose_the_victim_among_contexts_that_are_generating():
    """Two contexts generate at once in a cache too small for both: the lower bid is preempted (recomputed
    later), and both still produce their full output."""

    async def inferlet(input):
        model = Model.load()
        rt = model._pie._rt
        victims: list[int] = []
        preempt = rt.kv.preempt
        rt.kv.preempt = lambda seq, swap: (victims.append(seq.id), preempt(seq, swap))[1]
        ctxs = []
        for name in ("a", "b"):
            c = Context(model)
            c.append(list(range(1, 9)))
            c.set_bid(input[name])
            ctxs.append(c)
        ids = {c._inner._seq.id: n for c, n in zip(ctxs, "ab", strict=True)}
        gens = [c.generate(Sampler.argmax(), max_tokens=16, auto_flush=False).collect_tokens() for c in ctxs]
        outs = await asyncio.gather(*gens)
        assert [len(o) for o in outs] == [16, 16]
        return ids[victims[0]] if victims else "none"

    small = {"num_pages": 10, "page_size": 4, "num_swap_slots": 0}
    assert run(with_engine(inferlet, {"a": 5.0, "b": 1.0}, **small)) == "b"
    assert run(with_engine(inferlet, {"a": 1.0, "b": 5.0}, **small)) == "a"
