#!/usr/bin/env python3
"""Ray baseline: sand's 5-step chain as Ray tasks passing ObjectRefs.

The script starts its own local Ray cluster (``ray.init(num_cpus=2, include_dashboard=False)``,
session files in a private temp dir) and chains tasks without waiting in between:
``r = add.remote(x, 1); r = add.remote(r, 2); ...; ray.get(r, timeout=...)``, so Ray itself
passes each result to the next step.

The throughput phase runs its clients as threads of this one driver: Ray's API is thread-safe
and one driver submitting from many threads is how Ray is driven concurrently (a driver per
client would add a Ray core worker per client to a 2-core machine).

Run with the venv from setup.sh:
    VENV/bin/python ray_chain.py [--runs N] [--warmup W] [--clients C] [--seconds S]
"""

import os
import shutil
import signal
import sys
import tempfile
import time

# Leave no __pycache__ in the checkout, from this process or its children.
sys.dont_write_bytecode = True
os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chain_bench  # noqa: E402  (the bench folder is not a package)

CHAIN_TIMEOUT_S = 30.0
NUM_CPUS = 2
LEFTOVER_GRACE_S = 10.0


def chain_runner(ray, add):
    """``run_chain(x)``: five chained tasks, the last result fetched with a timeout."""
    def run_chain(x):
        ref = add.remote(x, 1)
        for i in range(2, chain_bench.STEPS + 1):
            ref = add.remote(ref, i)
        try:
            return ray.get(ref, timeout=CHAIN_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref, force=True)
            raise chain_bench.BenchFailure(
                f"chain({x}) gave no answer within {CHAIN_TIMEOUT_S} s") from None
    return run_chain


def processes_under(directory):
    """Pids of live processes whose command line names ``directory`` (our session's files).

    Every process of a Ray cluster (gcs_server, raylet, workers, log monitor...) is started with
    the session directory in its arguments, and that directory is this run's private temp dir,
    so this matches only processes this script's cluster started.
    """
    needle = directory.encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if needle in handle.read():
                    pids.append(int(entry))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return pids


def reap_leftovers(directory):
    """Ends any process of this cluster that ``ray.shutdown()`` left behind, by pid."""
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    while processes_under(directory) and time.monotonic() < deadline:
        time.sleep(0.2)
    leftovers = processes_under(directory)
    if not leftovers:
        return
    chain_bench.log(f"ray.shutdown() left {len(leftovers)} processes; killing pids {leftovers}")
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def bench(args):
    """Starts a local Ray cluster, measures, and shuts it down."""
    try:
        import ray
    except ImportError as error:
        raise chain_bench.Unavailable(f"cannot import ray: {error}") from None

    # Short and private: Ray's socket paths must fit in 107 bytes, and the directory both
    # holds the session's files and identifies the cluster's processes at teardown.
    directory = tempfile.mkdtemp(prefix="sandray-", dir="/tmp")
    started = False
    try:
        try:
            ray.init(num_cpus=NUM_CPUS, include_dashboard=False, _temp_dir=directory,
                     log_to_driver=False, logging_level="warning")
        except Exception as error:
            raise chain_bench.Unavailable(f"ray.init failed: {error}") from None
        started = True
        chain_bench.log(f"ray {ray.__version__} local cluster up in {directory}")

        @ray.remote
        def add(x, i):
            """One step: adds ``i`` to the input."""
            return x + i

        run_chain = chain_runner(ray, add)
        latency = chain_bench.measure_latency(run_chain, args.runs, args.warmup)
        chain_bench.log(f"latency: median {latency['median']} ms, p99 {latency['p99']} ms")
        throughput = chain_bench.measure_throughput(
            lambda _index, _config: (run_chain, lambda: None), None, args.clients,
            args.seconds, "threads", CHAIN_TIMEOUT_S)
        chain_bench.log(f"throughput: {throughput['chains_per_s']} chains/s")
        return {
            "system": "ray",
            "version": ray.__version__,
            "setup": f"local cluster, num_cpus={NUM_CPUS}, no dashboard, ObjectRefs chained, "
                     f"throughput clients as {args.clients} threads of one driver",
            "latency_ms": latency,
            "throughput": throughput,
        }
    finally:
        if started:
            ray.shutdown()
        reap_leftovers(directory)
        shutil.rmtree(directory, ignore_errors=True)


def main():
    """Runs the benchmark and prints its one JSON report."""
    args = chain_bench.parse_args("Latency and throughput of a 5-step Ray task chain.")
    return chain_bench.run_main("ray", lambda: bench(args))


if __name__ == "__main__":
    sys.exit(main())
