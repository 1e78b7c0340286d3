"""Types of the grain side, for editors and type checkers: what a handler is given and may
return. The runtime in the sandbox provides the real objects (runtimes/python/sand_runtime.py);
a grain needs this package only where it is edited and checked, so import it under
`TYPE_CHECKING`:

    from typing import TYPE_CHECKING, Any

    if TYPE_CHECKING:
        from sand_grain import Ctx, Result

    def handler(event: Any, ctx: "Ctx") -> "Result":
        return ctx.next("square", event + 1)
"""

from __future__ import annotations

from typing import Any, Iterable, Protocol, Tuple, Union

__all__ = ["Ctx", "FanOut", "Next", "Result"]


class Next(Protocol):
    """Returned by a handler: run `grain` with `value` next, on the same worker if it can."""

    grain: str
    value: Any


class FanOut(Protocol):
    """Returned by a handler: run each `(grain, value)` branch, then `join` with the list of
    their values, in branch order."""

    branches: list
    join: str


class Ctx(Protocol):
    """The second argument of a handler: the call's identity and the ways to go on. `exec`,
    `call` and `attempt` name this attempt of this call, so a grain that touches the outside
    world can make its effects idempotent (a retried or recovered call has the same `exec` and
    `call`, and another `attempt`). They are spelled as the HTTP API spells them: `exec` is the
    execution's reference (`sand logs EXEC` takes it), `call` the 16 hex digits of its trace.
    `trace` is this run's W3C `traceparent` (empty when the execution is not traced): with
    OpenTelemetry, `TraceContextTextMapPropagator().extract({"traceparent": ctx.trace})` gives
    the context for spans of the handler's own, children of the call's span."""

    exec: str
    call: str
    attempt: int
    trace: str

    def next(self, grain: str, value: Any) -> Next:
        """Run `grain` with `value` next: return what this gives."""
        ...

    def fan_out(self, branches: Iterable[Tuple[str, Any]], join: str) -> FanOut:
        """Run every `(grain, value)`, then `join` with the list of their values, in order:
        return what this gives."""
        ...


#: What a handler returns: a JSON value (the execution's answer, or the caller's branch
#: value), or a marker made by `ctx.next` or `ctx.fan_out`. Raising is the call's failure,
#: retried by the grain's policy.
Result = Union[Next, FanOut, Any]
