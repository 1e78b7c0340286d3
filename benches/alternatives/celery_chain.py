#!/usr/bin/env python3
"""Celery baseline: sand's 5-step chain as a Celery chain over Redis.

The script starts its own redis-server on a free 127.0.0.1 port (no persistence), used as both
broker and result backend, and its own worker (``celery worker -P prefork -c 2``, every other
setting at Celery's default) in its own process group. A chain is
``chain(add.s(x, 1), add.s(2), add.s(3), add.s(4), add.s(5))().get(timeout=...)``.

Celery's Redis result backend is not safe to share between threads of one client process, so
the throughput phase runs each client in its own process (spawned, each with its own app
connection), as a web server's worker processes would.

This module is also the worker's app module (``-A celery_chain``); the worker finds the Redis
URL in the environment variable SAND_BENCH_REDIS_URL.

Run with the venv from setup.sh:
    VENV/bin/python celery_chain.py [--runs N] [--warmup W] [--clients C] [--seconds S]
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

# Leave no __pycache__ in the checkout, from this process or its children.
sys.dont_write_bytecode = True
os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chain_bench  # noqa: E402  (the bench folder is not a package)

try:
    import celery
    from celery import Celery
except ImportError as import_error:  # reported as "unavailable" by main()
    celery = None
    CELERY_IMPORT_ERROR = import_error
else:
    CELERY_IMPORT_ERROR = None

REDIS_URL_ENV = "SAND_BENCH_REDIS_URL"
CHAIN_TIMEOUT_S = 30.0
REDIS_READY_TIMEOUT_S = 20.0
WORKER_READY_TIMEOUT_S = 90.0
TASK_NAME = "sand_bench.add"  # explicit: this module is __main__ in the client, not in the worker


def make_app(redis_url):
    """The Celery app: Redis as broker and result backend, everything else at defaults."""
    app = Celery("sand_bench", broker=redis_url, backend=redis_url)

    @app.task(name=TASK_NAME)
    def add(x, i):
        """One step: adds ``i`` to the input."""
        return x + i

    return app


# The worker imports this module with the URL in its environment and finds ``app`` here.
if celery is not None and REDIS_URL_ENV in os.environ:
    app = make_app(os.environ[REDIS_URL_ENV])


def chain_runner(app):
    """``run_chain(x)`` for an app: one 5-step chain, answer fetched with a timeout."""
    add = app.tasks[TASK_NAME]

    def run_chain(x):
        result = celery.chain(add.s(x, 1), *(add.s(i) for i in range(2, chain_bench.STEPS + 1)))()
        try:
            return result.get(timeout=CHAIN_TIMEOUT_S)
        except BaseException as error:
            # Unsubscribe now, while Redis is still up: otherwise the result's __del__ does it
            # at exit, after teardown, and retries the dead server for about 20 s.
            result.backend.remove_pending_result(result)
            if isinstance(error, celery.exceptions.TimeoutError):
                raise chain_bench.BenchFailure(
                    f"chain({x}) gave no answer within {CHAIN_TIMEOUT_S} s") from None
            raise

    return run_chain


def client_factory(_client_index, redis_url):
    """A throughput client with its own app and connections; returns ``(run_chain, close)``."""
    app = make_app(redis_url)
    return chain_runner(app), app.close


def redis_version(redis_server):
    """The redis-server version, e.g. "7.0.15"."""
    output = subprocess.run([redis_server, "--version"], capture_output=True, text=True,
                            timeout=10).stdout
    match = re.search(r"v=(\S+)", output)
    return match.group(1) if match else output.strip()


def start_redis(redis_server, directory):
    """Starts redis-server on a free loopback port; returns ``(process, port)`` once it answers."""
    import redis

    for _attempt in range(3):  # the free port may be taken between probe and bind
        port = chain_bench.free_loopback_port()
        log_path = os.path.join(directory, "redis.log")
        process = chain_bench.start_group(
            [redis_server, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
             "--appendonly", "no", "--dir", directory, "--daemonize", "no"],
            log_path)
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0,
                             socket_connect_timeout=1.0)
        deadline = time.monotonic() + REDIS_READY_TIMEOUT_S
        try:
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    if client.ping():
                        return process, port
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                    time.sleep(0.05)
        except BaseException:  # e.g. SIGTERM: the caller never gets the process to stop
            chain_bench.stop_group(process, "redis-server", grace_s=5.0)
            raise
        finally:
            client.close()
        chain_bench.stop_group(process, "redis-server", grace_s=5.0)
        chain_bench.log(f"redis-server on port {port} did not come up: "
                        + chain_bench.tail(log_path))
    raise chain_bench.Unavailable(
        f"redis-server did not answer PING within {REDIS_READY_TIMEOUT_S} s (3 attempts): "
        + chain_bench.tail(os.path.join(directory, "redis.log"), 5))


def start_worker(redis_url, directory):
    """Starts ``celery worker -P prefork -c 2`` in its own process group."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ)
    env[REDIS_URL_ENV] = redis_url
    env["PYTHONPATH"] = here + os.pathsep + env.get("PYTHONPATH", "")
    return chain_bench.start_group(
        [sys.executable, "-m", "celery", "-A", "celery_chain", "worker", "-P", "prefork",
         "-c", "2", "--hostname", f"sandbench{os.getpid()}@%h"],
        os.path.join(directory, "worker.log"), cwd=here, env=env)


def wait_for_worker(worker, run_chain, log_path):
    """Runs chains until one comes back right, or fails once the worker dies or time is up."""
    add_deadline = time.monotonic() + WORKER_READY_TIMEOUT_S
    while True:
        if worker.poll() is not None:
            raise chain_bench.Unavailable(
                f"celery worker exited with {worker.returncode}: {chain_bench.tail(log_path)}")
        try:
            chain_bench.check_answer(0, run_chain(0))
            return
        except chain_bench.BenchFailure:
            if time.monotonic() > add_deadline:
                raise chain_bench.Unavailable(
                    f"celery worker ran no chain within {WORKER_READY_TIMEOUT_S} s: "
                    + chain_bench.tail(log_path)) from None


def bench(args):
    """Starts Redis and a worker, measures, and tears everything down."""
    if celery is None:
        raise chain_bench.Unavailable(f"cannot import celery: {CELERY_IMPORT_ERROR}")
    try:
        import redis  # noqa: F401  (the transport and backend need the client)
    except ImportError as error:
        raise chain_bench.Unavailable(f"cannot import the redis client: {error}") from None
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise chain_bench.Unavailable("no redis-server on PATH (run setup.sh)")

    directory = tempfile.mkdtemp(prefix="sandcelery-")
    redis_process = worker = client_app = None
    try:
        redis_process, port = start_redis(redis_server, directory)
        redis_url = f"redis://127.0.0.1:{port}/0"
        chain_bench.log(f"redis-server {redis_version(redis_server)} on 127.0.0.1:{port}")
        worker = start_worker(redis_url, directory)
        client_app = make_app(redis_url)
        run_chain = chain_runner(client_app)
        wait_for_worker(worker, run_chain, os.path.join(directory, "worker.log"))
        chain_bench.log("celery worker answers")

        latency = chain_bench.measure_latency(run_chain, args.runs, args.warmup)
        chain_bench.log(f"latency: median {latency['median']} ms, p99 {latency['p99']} ms")
        throughput = chain_bench.measure_throughput(
            client_factory, redis_url, args.clients, args.seconds, "processes", CHAIN_TIMEOUT_S)
        chain_bench.log(f"throughput: {throughput['chains_per_s']} chains/s")
        if worker.poll() is not None:
            raise chain_bench.BenchFailure(f"celery worker died with {worker.returncode}")
        return {
            "system": "celery",
            "version": celery.__version__,
            "setup": f"Redis {redis_version(redis_server)} broker+backend, prefork -c 2, "
                     f"throughput clients as {args.clients} processes",
            "latency_ms": latency,
            "throughput": throughput,
        }
    finally:
        if client_app is not None:
            client_app.close()
        # Worker first (warm shutdown on SIGTERM), then the broker it talks to.
        chain_bench.stop_group(worker, "celery worker", grace_s=15.0)
        chain_bench.stop_group(redis_process, "redis-server", grace_s=5.0)
        shutil.rmtree(directory, ignore_errors=True)


def main():
    """Runs the benchmark and prints its one JSON report."""
    args = chain_bench.parse_args("Latency and throughput of a 5-step Celery chain over Redis.")
    return chain_bench.run_main("celery", lambda: bench(args))


if __name__ == "__main__":
    sys.exit(main())
