#!/usr/bin/env python3
"""Restate baseline: sand's 5-step chain as durable Restate handlers, called through the ingress.

Restate, like sand and unlike Celery or Ray, makes a chain's progress durable: every step's
result is written to its journal, on disk. The chain comes in two shapes, reported as two
systems (``--shape``):

- ``run`` (system ``restate-run``): one handler, ``Chain/run``, whose five steps are durable
  ``ctx.run_typed`` actions;
- ``handlers`` (system ``restate-handlers``): five handlers ``Steps/step1`` .. ``step5``; step i
  adds i and calls step i+1 (a durable request-response call), and step 5's answer comes back
  up the calls.

Each chain is one synchronous HTTP call to the ingress: ``POST /Chain/run`` or
``POST /Steps/step1`` with the JSON input, answered with the JSON output.

The script starts its own restate-server (VENV/bin/restate-server, linked by setup.sh, else the
one on PATH) in its own process group, with its data in a temp dir, its node, admin and ingress
ports on free 127.0.0.1 ports, and every other setting as shipped: the log and the partition
stores write RocksDB with its WAL fsynced (``rocksdb-disable-wal-fsync = false``; ``strace``
counts about 10 fdatasync per chain of the ``run`` shape, 30 of ``handlers``). Telemetry is
off (it reports nowhere here). The endpoint is this module, served by one Hypercorn process
(``--workers 0``: no worker subprocesses; asyncio; HTTP/2 without TLS, as the server calls
it), registered through the admin API (``POST /deployments``).

The throughput phase runs each client in its own process with its own keep-alive HTTP
connection, as a web server's worker processes would.

Run with the venv from setup.sh:
    VENV/bin/python restate_chain.py --shape run|handlers [--runs N] [--warmup W]
        [--clients C] [--seconds S]
"""

import http.client
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

# Leave no __pycache__ in the checkout, from this process or its children.
sys.dont_write_bytecode = True
os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chain_bench  # noqa: E402  (the bench folder is not a package)

# The ingress path each shape's chain starts at.
SHAPES = {"run": "Chain/run", "handlers": "Steps/step1"}
CHAIN_TIMEOUT_S = 30.0
SERVER_READY_TIMEOUT_S = 60.0
ENDPOINT_READY_TIMEOUT_S = 30.0
# After registration the ingress learns the services asynchronously; chains are retried
# until one answers right.
FIRST_CHAIN_TIMEOUT_S = 60.0
START_ATTEMPTS = 3  # a free port may be taken between probe and bind
SERVER_GRACE_S = 15.0


def system_name(shape):
    """The system a shape is reported as, e.g. "restate-run"."""
    return f"restate-{shape}"


def add(x, i):
    """One step: adds ``i`` to the input."""
    return x + i


def endpoint_app():
    """The ASGI app of the endpoint, both shapes' services (Hypercorn calls this)."""
    import restate

    chain = restate.Service("Chain")

    @chain.handler()
    async def run(ctx: restate.Context, x: int) -> int:
        """The whole chain in one handler: each step a durable action."""
        for i in range(1, chain_bench.STEPS + 1):
            x = await ctx.run_typed(f"add {i}", add, restate.RunOptions(), x, i)
        return x

    steps = restate.Service("Steps")

    def step(i, next_step):
        async def handler(ctx: restate.Context, x: int) -> int:
            if next_step is None:
                return add(x, i)
            return await ctx.service_call(next_step, arg=add(x, i))
        handler.__doc__ = f"Step {i} of the chain: adds {i}, then calls the next step."
        return steps.handler(name=f"step{i}")(handler)

    next_step = None
    for i in range(chain_bench.STEPS, 0, -1):
        next_step = step(i, next_step)

    return restate.app(services=[chain, steps])


class Ingress:
    """A keep-alive HTTP connection to the ingress that runs one shape's chain."""

    def __init__(self, port, shape):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=CHAIN_TIMEOUT_S)
        self.path = "/" + SHAPES[shape]

    def run_chain(self, x):
        """Runs one chain synchronously; returns its answer."""
        try:
            self.connection.request("POST", self.path, body=json.dumps(x),
                                    headers={"content-type": "application/json"})
            response = self.connection.getresponse()
            body = response.read()
        except socket.timeout:
            self.connection.close()
            raise chain_bench.BenchFailure(
                f"chain({x}) gave no answer within {CHAIN_TIMEOUT_S} s") from None
        except (OSError, http.client.HTTPException) as error:
            self.connection.close()
            raise chain_bench.BenchFailure(f"chain({x}): {error!r}") from None
        if response.status != 200:
            raise chain_bench.BenchFailure(
                f"chain({x}): HTTP {response.status}: {body[:300].decode(errors='replace')}")
        return json.loads(body)

    def close(self):
        """Closes the connection."""
        self.connection.close()


def client_factory(_client_index, config):
    """A throughput client with its own connection; returns ``(run_chain, close)``."""
    ingress = Ingress(*config)
    return ingress.run_chain, ingress.close


def server_binary():
    """The restate-server that setup.sh linked into this venv, else the one on PATH."""
    linked = os.path.join(sys.prefix, "bin", "restate-server")
    return linked if os.access(linked, os.X_OK) else shutil.which("restate-server")


def server_version(binary):
    """The server's version, e.g. "1.7.12"."""
    output = subprocess.run([binary, "--version"], capture_output=True, text=True,
                            timeout=10).stdout.strip()
    return output.removeprefix("restate-server ")


def http_status(port, method, path, body=None, timeout=2.0):
    """``(status, body)`` of one request to 127.0.0.1:port, or None if nothing answers."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"content-type": "application/json"} if body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


def wait_until(ready, process, deadline):
    """Polls ``ready()`` until it is true (True), the process exits or the deadline passes."""
    while time.monotonic() < deadline and process.poll() is None:
        if ready():
            return True
        time.sleep(0.1)
    return False


def start_server(binary, directory):
    """Starts restate-server on free loopback ports; returns ``(process, admin, ingress)``."""
    log_path = os.path.join(directory, "restate-server.log")
    for _attempt in range(START_ATTEMPTS):
        node, admin, ingress = (chain_bench.free_loopback_port() for _ in range(3))
        config_path = os.path.join(directory, "restate.toml")
        with open(config_path, "w") as config:
            config.write(f'node-name = "sandbench"\n'
                         f'disable-telemetry = true\n'
                         f'bind-address = "127.0.0.1:{node}"\n'
                         f'advertised-address = "http://127.0.0.1:{node}/"\n'
                         f'[admin]\nbind-address = "127.0.0.1:{admin}"\n'
                         f'[ingress]\nbind-address = "127.0.0.1:{ingress}"\n')
        data = tempfile.mkdtemp(prefix="data-", dir=directory)
        process = chain_bench.start_group(
            [binary, "--config-file", config_path, "--base-dir", data, "--no-logo"],
            log_path, env={**os.environ, "NO_COLOR": "1"})
        try:
            up = wait_until(
                lambda: (http_status(admin, "GET", "/health") or (0,))[0] == 200
                and (http_status(ingress, "GET", "/restate/health") or (0,))[0] == 200,
                process, time.monotonic() + SERVER_READY_TIMEOUT_S)
        except BaseException:  # e.g. SIGTERM: the caller never gets the process to stop
            chain_bench.stop_group(process, "restate-server", SERVER_GRACE_S)
            raise
        if up:
            return process, admin, ingress
        chain_bench.stop_group(process, "restate-server", SERVER_GRACE_S)
        chain_bench.log("restate-server did not come up: " + chain_bench.tail(log_path))
    raise chain_bench.Unavailable(
        f"restate-server did not answer on its admin and ingress ports within "
        f"{SERVER_READY_TIMEOUT_S} s ({START_ATTEMPTS} attempts): "
        + chain_bench.tail(log_path, 5))


def start_endpoint(directory):
    """Starts this module's endpoint in one Hypercorn process; returns ``(process, port)``."""
    here = os.path.dirname(os.path.abspath(__file__))
    log_path = os.path.join(directory, "endpoint.log")
    for _attempt in range(START_ATTEMPTS):
        port = chain_bench.free_loopback_port()
        process = chain_bench.start_group(
            [sys.executable, "-m", "hypercorn", "--bind", f"127.0.0.1:{port}", "--workers",
             "0", "restate_chain:endpoint_app()"],
            log_path, cwd=here)
        try:
            up = wait_until(lambda: http_status(port, "GET", "/health") is not None, process,
                            time.monotonic() + ENDPOINT_READY_TIMEOUT_S)
        except BaseException:
            chain_bench.stop_group(process, "endpoint", stop_signal=signal.SIGINT)
            raise
        if up:
            return process, port
        chain_bench.stop_group(process, "endpoint", stop_signal=signal.SIGINT)
        chain_bench.log("the endpoint did not come up: " + chain_bench.tail(log_path))
    raise chain_bench.Unavailable(
        f"the Hypercorn endpoint did not answer within {ENDPOINT_READY_TIMEOUT_S} s "
        f"({START_ATTEMPTS} attempts): " + chain_bench.tail(log_path, 5))


def register(admin, endpoint):
    """Registers the endpoint's deployment with the server (the admin API)."""
    answer = http_status(admin, "POST", "/deployments",
                         body=json.dumps({"uri": f"http://127.0.0.1:{endpoint}"}),
                         timeout=30.0)
    if answer is None or answer[0] not in (200, 201):
        raise chain_bench.Unavailable(f"registering the endpoint failed: {answer}")


def wait_for_chain(ingress, components):
    """Runs chains until one comes back right; fails once a component dies or time is up."""
    deadline = time.monotonic() + FIRST_CHAIN_TIMEOUT_S
    while True:
        for name, process, log_path in components:
            if process.poll() is not None:
                raise chain_bench.Unavailable(
                    f"{name} exited with {process.returncode}: {chain_bench.tail(log_path)}")
        try:
            chain_bench.check_answer(0, ingress.run_chain(0))
            return
        except chain_bench.BenchFailure as error:
            if time.monotonic() > deadline:
                raise chain_bench.Unavailable(
                    f"no chain answered within {FIRST_CHAIN_TIMEOUT_S} s: {error}") from None
            time.sleep(0.2)


def bench(args):
    """Starts the server and the endpoint, measures one shape, and tears everything down."""
    try:
        import restate  # noqa: F401  (the endpoint's SDK)
        import hypercorn  # noqa: F401  (the endpoint's server)
    except ImportError as error:
        raise chain_bench.Unavailable(f"cannot import the endpoint's packages: {error}") from None
    binary = server_binary()
    if binary is None:
        raise chain_bench.Unavailable("no restate-server in the venv or on PATH (run setup.sh)")

    directory = tempfile.mkdtemp(prefix="sandrestate-")
    server = endpoint = ingress = None
    try:
        server, admin_port, ingress_port = start_server(binary, directory)
        version = server_version(binary)
        chain_bench.log(f"restate-server {version}: admin 127.0.0.1:{admin_port}, "
                        f"ingress 127.0.0.1:{ingress_port}")
        endpoint, endpoint_port = start_endpoint(directory)
        register(admin_port, endpoint_port)
        chain_bench.log(f"endpoint on 127.0.0.1:{endpoint_port} registered")
        ingress = Ingress(ingress_port, args.shape)
        components = [
            ("restate-server", server, os.path.join(directory, "restate-server.log")),
            ("the endpoint", endpoint, os.path.join(directory, "endpoint.log")),
        ]
        wait_for_chain(ingress, components)
        chain_bench.log(f"{SHAPES[args.shape]} answers")

        latency = chain_bench.measure_latency(ingress.run_chain, args.runs, args.warmup)
        chain_bench.log(f"latency: median {latency['median']} ms, p99 {latency['p99']} ms")
        throughput = chain_bench.measure_throughput(
            client_factory, (ingress_port, args.shape), args.clients, args.seconds,
            "processes", CHAIN_TIMEOUT_S)
        chain_bench.log(f"throughput: {throughput['chains_per_s']} chains/s")
        for name, process, _log in components:
            if process.poll() is not None:
                raise chain_bench.BenchFailure(f"{name} died with {process.returncode}")
        shape = ("one handler, 5 durable ctx.run steps" if args.shape == "run"
                 else "5 handlers, each calling the next")
        return {
            "system": system_name(args.shape),
            "version": version,
            "setup": f"{shape}; sync ingress calls; one node, settings as shipped "
                     f"(RocksDB WAL fsync on); Python SDK "
                     f"{importlib.metadata.version('restate-sdk')} in one Hypercorn "
                     f"{importlib.metadata.version('hypercorn')} process; throughput "
                     f"clients as {args.clients} processes",
            "latency_ms": latency,
            "throughput": throughput,
        }
    finally:
        if ingress is not None:
            ingress.close()
        # The server first, then the endpoint it calls. The endpoint stops on SIGINT: the SDK
        # takes SIGTERM over from Hypercorn (to drain its invocations) and never exits on it.
        chain_bench.stop_group(server, "restate-server", SERVER_GRACE_S)
        chain_bench.stop_group(endpoint, "endpoint", stop_signal=signal.SIGINT)
        shutil.rmtree(directory, ignore_errors=True)


def parse_args(argv=None):
    """The options of every baseline script, and the chain's shape."""
    parser = chain_bench.argument_parser(
        "Latency and throughput of a 5-step chain on Restate, sync through its ingress.")
    parser.add_argument("--shape", required=True, choices=sorted(SHAPES),
                        help="run: one handler, 5 durable ctx.run steps; "
                             "handlers: 5 handlers, each calling the next")
    return parser.parse_args(argv)


def main():
    """Runs the benchmark and prints its one JSON report."""
    args = parse_args()
    return chain_bench.run_main(system_name(args.shape), lambda: bench(args))


if __name__ == "__main__":
    sys.exit(main())
