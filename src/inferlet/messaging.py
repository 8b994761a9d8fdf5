"""Pie's `inferlet.messaging`: push/pull queues and broadcast/subscribe between the inferlets of one engine.

    messaging.push("jobs", "task 1")            # one puller gets it, first in first out
    job = await messaging.pull("jobs")          # waits for a message
    messaging.broadcast("news", "hello")        # every subscription open on "news" gets it
    with messaging.subscribe("news") as sub:
        async for message in sub: ...

Messages are strings (send JSON text for structure). Queues and broadcast topics are separate even under
one name. A subscription buffers messages broadcast after it was opened; the engine closes the
subscriptions an inferlet leaves open when it ends (pie.runtime.messaging has the semantics).
"""

from __future__ import annotations

from pie.runtime import messaging as _rt
from pie.runtime.scope import current_scope


def _broker() -> _rt.Broker:
    return current_scope().engine.broker


def _check(topic: str, message: str | None = None) -> None:
    if not isinstance(topic, str) or not topic:
        raise ValueError(f"a messaging topic must be a non-empty string, got {topic!r}")
    if message is not None and not isinstance(message, str):
        raise TypeError(
            f"messages are strings, got {type(message).__name__}; send json.dumps(value) for structured data"
        )


def push(topic: str, message: str) -> None:
    """Push a message to a topic (point-to-point: exactly one pull gets it)."""
    _check(topic, message)
    _broker().push(topic, message)


async def pull(topic: str) -> str:
    """Pull the next message from a topic, waiting for one."""
    _check(topic)
    return await _broker().pull(topic)


def broadcast(topic: str, message: str) -> None:
    """Broadcast a message to all subscribers of a topic."""
    _check(topic, message)
    _broker().broadcast(topic, message)


def subscribe(topic: str) -> Subscription:
    """Subscribe to a topic. Returns an async iterable subscription."""
    _check(topic)
    scope = current_scope()
    sub = Subscription(scope.engine.broker.subscribe(topic))
    scope.track(sub)
    return sub


class Subscription:
    """Async iterable subscription to a messaging topic:

    with messaging.subscribe("events") as sub:
        async for message in sub:
            print(message)
    """

    __slots__ = ("_handle", "__weakref__")

    def __init__(self, handle: _rt.Subscription) -> None:
        self._handle = handle

    async def next(self) -> str | None:
        """Get the next message, or None once unsubscribed (messages already received come first)."""
        return await self._handle.next()

    def unsubscribe(self) -> None:
        """Unsubscribe from the topic (idempotent); a waiting next() returns None."""
        self._handle.close()

    close = unsubscribe  # the engine closes what an inferlet leaves open

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *args) -> None:
        self.unsubscribe()

    def __aiter__(self):
        return self

    async def __anext__(self) -> str:
        result = await self.next()
        if result is None:
            raise StopAsyncIteration
        return result
