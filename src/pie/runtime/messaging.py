"""Messages between the inferlets of one engine (Pie's `inferlet.messaging`).

Two kinds of topic, independent of each other even under the same name:
  queues      push(topic, m) / await pull(topic): each message goes to exactly one puller, first in first
              out; pullers waiting on a topic are served in the order they started waiting
  broadcast   broadcast(topic, m) goes to every subscription open on the topic at that moment, in order;
              a subscription buffers what it has not read yet

Nothing here outlives its users: a topic is forgotten when its queue and waiters are empty, and the engine
closes an inferlet's subscriptions when it ends (they are tracked in its scope).
"""

from __future__ import annotations

import asyncio
from collections import deque


class Subscription:
    """One subscriber's view of a broadcast topic: await next() gives messages in order, None once closed."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self.broker = broker
        self.topic = topic
        self._messages: deque[str] = deque()
        self._waiter: asyncio.Future | None = None
        self.closed = False

    def _deliver(self, message: str) -> None:
        self._messages.append(message)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def get(self) -> str | None:
        """The next buffered message, or None if none is buffered."""
        return self._messages.popleft() if self._messages else None

    async def next(self) -> str | None:
        """The next message, waiting for one; None when the subscription is closed (buffered ones first)."""
        while not self._messages:
            if self.closed:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._messages.popleft()

    def close(self) -> None:
        """Unsubscribe (idempotent); a waiting next() returns None."""
        if self.closed:
            return
        self.closed = True
        self.broker._unsubscribe(self)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Broker:
    """The engine's message topics."""

    def __init__(self) -> None:
        self._queues: dict[str, deque[str]] = {}
        self._pullers: dict[str, deque[asyncio.Future]] = {}
        self._subs: dict[str, list[Subscription]] = {}

    # ---- queues ---------------------------------------------------------------------------------
    def push(self, topic: str, message: str) -> None:
        if not self._hand(topic, message):
            self._queues.setdefault(topic, deque()).append(message)

    def _hand(self, topic: str, message: str) -> bool:
        """Give the message to the longest-waiting live puller, if any."""
        waiters = self._pullers.get(topic)
        while waiters:
            fut = waiters.popleft()
            if not fut.done():  # a cancelled pull left its future behind: skip it
                fut.set_result(message)
                self._forget(topic)
                return True
        return False

    async def pull(self, topic: str) -> str:
        queue = self._queues.get(topic)
        if queue and not self._pullers.get(topic):
            message = queue.popleft()
            self._forget(topic)
            return message
        fut = asyncio.get_running_loop().create_future()
        self._pullers.setdefault(topic, deque()).append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # handed a message just as we were cancelled: it goes
                # to the next puller, or back to the head of the queue
                if not self._hand(topic, fut.result()):
                    self._queues.setdefault(topic, deque()).appendleft(fut.result())
            else:
                fut.cancel()
            raise
        finally:
            waiters = self._pullers.get(topic)
            if waiters is not None and fut in waiters:
                waiters.remove(fut)
            self._forget(topic)

    # ---- broadcast ------------------------------------------------------------------------------
    def subscribe(self, topic: str) -> Subscription:
        sub = Subscription(self, topic)
        self._subs.setdefault(topic, []).append(sub)
        return sub

    def broadcast(self, topic: str, message: str) -> int:
        """Deliver to every open subscription of the topic; returns how many got it."""
        subs = self._subs.get(topic, ())
        for sub in subs:
            sub._deliver(message)
        return len(subs)

    def _unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.topic)
        if subs is not None and sub in subs:
            subs.remove(sub)
            if not subs:
                del self._subs[sub.topic]

    # ---- bookkeeping ----------------------------------------------------------------------------
    def _forget(self, topic: str) -> None:
        if not self._queues.get(topic, True):
            del self._queues[topic]
        if not self._pullers.get(topic, True):
            del self._pullers[topic]

    def stats(self) -> dict:
        return {
            "queued": sum(len(q) for q in self._queues.values()),
            "pullers": sum(len(p) for p in self._pullers.values()),
            "subscriptions": sum(len(s) for s in self._subs.values()),
            "topics": len(set(self._queues) | set(self._pullers) | set(self._subs)),
        }
