"""How SDK code finds its engine: a contextvar set by Engine.run_inferlet for the inferlet's task.

asyncio copies the context into every task an inferlet creates, so contexts built inside
asyncio.gather / create_task belong to the same inferlet and are closed when it ends.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from pie.errors import PieError

if TYPE_CHECKING:
    from pie.runtime.engine import Engine
    from pie.runtime.session import Session


class Closable(Protocol):
    def close(self) -> None: ...


@dataclass(eq=False)
class InferletScope:
    engine: Engine
    default_model: str
    resources: dict[int, Closable] = field(default_factory=dict)  # id -> open contexts, in creation order
    returned: object = None  # inferlet.set_return(value): the result when main returns None
    session: Session | None = None  # the client (pie.runtime.session); None: no client attached
    program: str = ""  # what was run (a built-in name, a path, a function's name): for launch / logs

    def track(self, obj: Closable) -> None:
        self.resources[id(obj)] = obj

    def untrack(self, obj: Closable) -> None:
        self.resources.pop(id(obj), None)

    def close_all(self) -> None:
        """Free what the inferlet left open (its contexts' pages, subscriptions, running children)."""
        for obj in list(self.resources.values())[::-1]:
            obj.close()
        self.resources.clear()


_current: ContextVar[InferletScope | None] = ContextVar("pie_inferlet_scope", default=None)


def current_scope() -> InferletScope:
    scope = _current.get()
    if scope is None:
        raise PieError(
            "no running pie engine here: SDK objects (Model, Context) work inside an inferlet run by "
            "`pie run` or Engine.run_inferlet"
        )
    return scope


def set_scope(scope: InferletScope | None):
    return _current.set(scope)
