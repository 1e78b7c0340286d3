"""A client of sand's HTTP API, standard library only.

    from sand_client import Client

    sand = Client()                                  # SAND_GATEWAY, SAND_TOKEN, .sand/token
    sand.invoke("pipeline", 3)                       # 49: waits up to 30 s for the answer
    ref = sand.invoke_async("pipeline", 3, idempotency_key="order-17")
    sand.result(ref)                                 # 49, once it has ended
    sand.status(ref).calls[0].grain                  # "double"
    for call in sand.logs(ref):
        print(call.grain, call.stdout)

The semantics are the CLI's (`sand invoke`, `sand status`, `sand logs`): a synchronous
invocation waits up to `wait` seconds on the gateway; an idempotency key makes a retried
request name the first execution, and the same key with another input is refused; a grain's
failure after its last retry is the execution's answer, raised here as `GrainFailed`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

__all__ = [
    "ApiError",
    "Call",
    "Client",
    "Execution",
    "GrainFailed",
    "StillRunning",
]

DEFAULT_GATEWAY = "http://127.0.0.1:8080"
#: Where `sand dev` keeps its token; read only for a gateway on this machine, as the CLI does.
DEV_TOKEN_FILE = os.path.join(".sand", "token")


class ApiError(Exception):
    """The gateway refused a request: its HTTP status, its error code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class GrainFailed(Exception):
    """The execution ended failed: a grain's error after its last retry, or the platform's."""

    def __init__(self, execution: str, kind: str, message: str) -> None:
        super().__init__(f"execution {execution} failed ({kind}): {message}")
        self.execution = execution
        self.kind = kind
        self.message = message


class StillRunning(Exception):
    """The wait ran out before the execution ended; it goes on. `result` waits for it."""

    def __init__(self, execution: str) -> None:
        super().__init__(f"execution {execution} is still running")
        self.execution = execution


@dataclass(frozen=True)
class Call:
    """One attempt of one grain call, as the execution's trace records it."""

    call: str
    grain: str
    attempt: int
    worker: int
    #: "gateway" if the gateway dispatched it, "local" if its worker's local bus did.
    via: str
    #: Why the gateway dispatched it: "first", "retry" or "recovery"; "local" for the local bus.
    reason: str
    #: True if it re-ran a call whose owner was lost.
    recovery: bool
    dispatched_ms: Optional[int]
    started_ms: Optional[int]
    ended_ms: Optional[int]
    #: `(kind, message)` if it failed.
    error: Optional[Tuple[str, str]]
    stdout: str
    stderr: str
    #: The start of its input (at most 4 KiB of its JSON text); `input_cut` if there was more.
    input: str
    input_cut: bool
    #: The start of the value it returned; None if it chained, fanned out or failed.
    output: Optional[str]
    output_cut: bool
    #: The calls it emitted: its `next`, or its fan-out's branches then their join.
    emitted: List[str]

    @classmethod
    def from_json(cls, c: dict) -> "Call":
        error = c.get("error")
        return cls(
            call=c["call"],
            grain=c["grain"],
            attempt=c["attempt"],
            worker=c["worker"],
            via=c["via"],
            reason=c.get("reason", ""),
            recovery=bool(c.get("recovery")),
            dispatched_ms=c.get("dispatched_ms"),
            started_ms=c.get("started_ms"),
            ended_ms=c.get("ended_ms"),
            error=(error["kind"], error["message"]) if error else None,
            stdout=c.get("stdout", ""),
            stderr=c.get("stderr", ""),
            input=c.get("input", ""),
            input_cut=bool(c.get("input_cut")),
            output=c.get("output"),
            output_cut=bool(c.get("output_cut")),
            emitted=list(c.get("emitted", [])),
        )


@dataclass(frozen=True)
class Execution:
    """An execution as the gateway holds it."""

    id: str
    app: str
    #: "running", "succeeded" or "failed".
    status: str
    #: The answer, once succeeded.
    output: Any
    #: `(kind, message)`, once failed.
    error: Optional[Tuple[str, str]]
    calls: List[Call]

    @property
    def ended(self) -> bool:
        return self.status != "running"

    def value(self) -> Any:
        """The output of a succeeded execution; `GrainFailed` for a failed one."""
        if self.error is not None:
            raise GrainFailed(self.id, *self.error)
        if not self.ended:
            raise StillRunning(self.id)
        return self.output


class Client:
    """A client of one gateway's API.

    `gateway` defaults to SAND_GATEWAY, else http://127.0.0.1:8080. The token is `token`, else
    the content of `token_file`, else SAND_TOKEN, else, for a gateway on this machine only,
    `.sand/token` (the one `sand dev` writes). `ca_file` is the CA to trust for an https
    gateway (the cluster's `ca.crt`), instead of the system's. `timeout` bounds each HTTP
    exchange; a synchronous invocation's own `wait` is added to it.
    """

    def __init__(
        self,
        gateway: Optional[str] = None,
        *,
        token: Optional[str] = None,
        token_file: Optional[str] = None,
        ca_file: Optional[str] = None,
        timeout: float = 30.0,
    ) -> None:
        self.gateway = (gateway or os.environ.get("SAND_GATEWAY") or DEFAULT_GATEWAY).rstrip("/")
        self.timeout = timeout
        self._token = _token(self.gateway, token, token_file)
        self._tls = ssl.create_default_context(cafile=ca_file) if ca_file else None

    def invoke(
        self,
        app: str,
        input: Any = None,
        *,
        wait: float = 30.0,
        idempotency_key: Optional[str] = None,
    ) -> Any:
        """Runs `app` on `input` and returns its output, waiting up to `wait` seconds.

        Raises `GrainFailed` if the execution failed, `StillRunning` (with the execution's
        reference) if the wait ran out, `ApiError` if the gateway refused the request.
        """
        query = f"wait={_seconds(wait)}"
        status, body = self._post(app, query, input, idempotency_key, wait)
        execution = body["execution"]
        if status == 202:
            raise StillRunning(execution)
        if "error" in body:
            raise GrainFailed(execution, body["error"]["kind"], body["error"]["message"])
        return body.get("output")

    def invoke_async(
        self, app: str, input: Any = None, *, idempotency_key: Optional[str] = None
    ) -> str:
        """Starts `app` on `input`; returns the execution's reference once its acceptance is
        durable."""
        _, body = self._post(app, "async=true", input, idempotency_key, 0.0)
        return body["execution"]

    def status(self, execution: str) -> Execution:
        """The execution as it is now."""
        body = self._request("GET", f"/v1/executions/{_segment(execution)}")
        error = body.get("error")
        return Execution(
            id=body.get("execution", execution),
            app=body.get("app", ""),
            status=body["status"],
            output=body.get("output"),
            error=(error["kind"], error["message"]) if error else None,
            calls=[Call.from_json(c) for c in body.get("calls", [])],
        )

    def result(self, execution: str, *, timeout: Optional[float] = None, poll: float = 0.05) -> Any:
        """Waits for the execution to end and returns its output (`GrainFailed` if it failed).
        With `timeout`, raises `StillRunning` if it has not ended by then. Polls, backing off
        from `poll` seconds to one second."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            now = self.status(execution)
            if now.ended:
                return now.value()
            if deadline is not None and time.monotonic() >= deadline:
                raise StillRunning(execution)
            time.sleep(poll)
            poll = min(poll * 2, 1.0)

    def logs(self, execution: str) -> List[Call]:
        """The execution's calls, each with what it printed, in the order they ran."""
        return self.status(execution).calls

    def _post(
        self, app: str, query: str, input: Any, key: Optional[str], wait: float
    ) -> Tuple[int, dict]:
        body = json.dumps(input, allow_nan=False).encode()
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Idempotency-Key"] = key
        path = f"/v1/apps/{_segment(app)}/invoke?{query}"
        return self._exchange("POST", path, body, headers, self.timeout + wait)

    def _request(self, method: str, path: str) -> dict:
        return self._exchange(method, path, None, {}, self.timeout)[1]

    def _exchange(
        self, method: str, path: str, body: Optional[bytes], headers: dict, timeout: float
    ) -> Tuple[int, dict]:
        request = urllib.request.Request(self.gateway + path, data=body, method=method)
        for name, value in headers.items():
            request.add_header(name, value)
        if self._token is not None:
            request.add_header("Authorization", f"Bearer {self._token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=self._tls) as reply:
                status, text = reply.status, reply.read()
        except urllib.error.HTTPError as e:
            raise _api_error(e) from None
        try:
            return status, json.loads(text)
        except ValueError:
            raise ApiError(status, "bad_answer", f"the gateway's answer is not JSON: {text[:200]!r}") from None


def _api_error(e: urllib.error.HTTPError) -> ApiError:
    try:
        error = json.load(e)["error"]
        return ApiError(e.code, error.get("code", "?"), error.get("message", ""))
    except (ValueError, KeyError, TypeError):
        return ApiError(e.code, "http", e.reason or "")


def _token(gateway: str, token: Optional[str], token_file: Optional[str]) -> Optional[str]:
    if token is not None:
        return token.strip()
    if token_file is not None:
        with open(token_file, encoding="utf-8") as f:
            return f.read().strip()
    if os.environ.get("SAND_TOKEN"):
        return os.environ["SAND_TOKEN"].strip()
    # The dev token goes only to a gateway on this machine, never to one named by a URL.
    if _is_loopback(gateway) and os.path.exists(DEV_TOKEN_FILE):
        with open(DEV_TOKEN_FILE, encoding="utf-8") as f:
            return f.read().strip()
    return None


def _is_loopback(gateway: str) -> bool:
    host = urllib.parse.urlsplit(gateway if "://" in gateway else "http://" + gateway).hostname
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _segment(name: str) -> str:
    """`name` as one URL path segment: nothing in it can reach another route."""
    return urllib.parse.quote(name, safe="")


def _seconds(wait: float) -> str:
    """`wait` as the query wants it: a plain decimal number of seconds."""
    if not 0 <= wait < float("inf"):
        raise ValueError(f"wait must be a number of seconds, 0 or more, not {wait!r}")
    return repr(float(wait))
