#!/usr/bin/env python3
"""The floor: five warm Python processes chained by Unix datagrams (stdlib only).

Stage i (1..5) is a process bound to ``DIR/stage<i>``: it receives a datagram, adds i to the
value in it and sends it to stage i+1; stage 5 sends it back to the client's own socket. A
datagram is 16 bytes: the value (signed 64-bit) and the client's index (unsigned 64-bit), whose
reply socket is ``DIR/client<index>``. Nothing but the five hops and the client's send and
receive is on the path, so this is what any chain of Python steps costs at least.

Run: python3 unix_chain.py [--runs N] [--warmup W] [--clients C] [--seconds S]
"""

import argparse
import os
import platform
import shutil
import socket
import struct
import sys
import tempfile
import time

# Leave no __pycache__ in the checkout, from this process or its children.
sys.dont_write_bytecode = True
os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chain_bench  # noqa: E402  (the bench folder is not a package)

MESSAGE = struct.Struct("<qQ")
CHAIN_TIMEOUT_S = 10
STAGE_READY_TIMEOUT_S = 20.0
LATENCY_CLIENT = 1_000_000  # client index of the latency phase; throughput uses 0..C-1


def set_receive_timeout(sock, seconds):
    """Makes a blocking recv on ``sock`` fail with EAGAIN after ``seconds`` (whole seconds)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", int(seconds), 0))


def stage_main(index, directory):
    """Runs stage ``index`` until its parent goes away or it is signalled."""
    parent = os.getppid()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(os.path.join(directory, f"stage{index}"))
    # Wake up now and then to notice an orphaned stage. SO_RCVTIMEO, not settimeout(): a
    # Python-level timeout adds a poll() before every recv on the hot path.
    set_receive_timeout(sock, 1)
    last = index == chain_bench.STEPS
    next_stage = os.path.join(directory, f"stage{index + 1}")
    while True:
        try:
            data = sock.recv(64)
        except BlockingIOError:
            if os.getppid() != parent:
                return
            continue
        if len(data) != MESSAGE.size:
            print(f"stage {index}: dropped a {len(data)}-byte datagram", file=sys.stderr)
            continue
        value, client = MESSAGE.unpack(data)
        value += index
        target = os.path.join(directory, f"client{client}") if last else next_stage
        try:
            sock.sendto(MESSAGE.pack(value, client), target)
        except OSError as error:  # a client that has gone away must not stop the chain
            print(f"stage {index}: send to {target} failed: {error}", file=sys.stderr)


def client_factory(client_index, directory):
    """A client bound to its own reply socket; returns ``(run_chain, close)``."""
    path = os.path.join(directory, f"client{client_index}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    set_receive_timeout(sock, CHAIN_TIMEOUT_S)
    first = os.path.join(directory, "stage1")

    def run_chain(x):
        sock.sendto(MESSAGE.pack(x, client_index), first)
        try:
            data = sock.recv(64)
        except BlockingIOError:
            raise chain_bench.BenchFailure(
                f"no answer for chain({x}) within {CHAIN_TIMEOUT_S} s") from None
        value, client = MESSAGE.unpack(data)
        if client != client_index:
            raise chain_bench.BenchFailure(f"client {client_index} got client {client}'s reply")
        return value

    def close():
        sock.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    return run_chain, close


def wait_for_stages(directory, stages):
    """Waits until every stage has bound its socket, or fails with the stage that did not."""
    deadline = time.monotonic() + STAGE_READY_TIMEOUT_S
    for index, process in enumerate(stages, start=1):
        path = os.path.join(directory, f"stage{index}")
        while not os.path.exists(path):
            if process.poll() is not None:
                raise chain_bench.Unavailable(
                    f"stage {index} exited with {process.returncode}: "
                    + chain_bench.tail(os.path.join(directory, f"stage{index}.log")))
            if time.monotonic() > deadline:
                raise chain_bench.Unavailable(
                    f"stage {index} did not bind {path} within {STAGE_READY_TIMEOUT_S} s")
            time.sleep(0.01)


def bench(args):
    """Starts the five stages, measures, and tears everything down."""
    # A short path: AF_UNIX socket paths are limited to 107 bytes.
    directory = tempfile.mkdtemp(prefix="sandux-", dir="/tmp")
    stages = []
    try:
        script = os.path.abspath(__file__)
        for index in range(1, chain_bench.STEPS + 1):
            stages.append(chain_bench.start_group(
                [sys.executable, script, "--stage", str(index), "--dir", directory],
                os.path.join(directory, f"stage{index}.log")))
        wait_for_stages(directory, stages)
        chain_bench.log(f"5 stages up in {directory}")

        run_chain, close = client_factory(LATENCY_CLIENT, directory)
        try:
            latency = chain_bench.measure_latency(run_chain, args.runs, args.warmup)
        finally:
            close()
        chain_bench.log(f"latency: median {latency['median']} ms, p99 {latency['p99']} ms")

        throughput = chain_bench.measure_throughput(
            client_factory, directory, args.clients, args.seconds, "processes",
            CHAIN_TIMEOUT_S)
        chain_bench.log(f"throughput: {throughput['chains_per_s']} chains/s")
        for index, process in enumerate(stages, start=1):
            if process.poll() is not None:
                raise chain_bench.BenchFailure(f"stage {index} died during the run")
    finally:
        for index, process in enumerate(stages, start=1):
            chain_bench.stop_group(process, f"stage {index}", grace_s=5.0)
        shutil.rmtree(directory, ignore_errors=True)
    return {
        "system": "unix",
        "version": f"python {platform.python_version()}",
        "setup": "5 warm python3 processes, AF_UNIX SOCK_DGRAM hops, "
                 f"throughput clients as {args.clients} processes",
        "latency_ms": latency,
        "throughput": throughput,
    }


def main():
    """Dispatches between the benchmark and the hidden ``--stage`` mode of its children."""
    if "--stage" in sys.argv:
        parser = argparse.ArgumentParser()
        parser.add_argument("--stage", type=int, required=True)
        parser.add_argument("--dir", required=True)
        stage_args = parser.parse_args()
        chain_bench.terminate_on_sigterm()
        try:
            stage_main(stage_args.stage, stage_args.dir)
        except (SystemExit, KeyboardInterrupt):
            pass
        return 0
    args = chain_bench.parse_args("Latency and throughput of a 5-step Unix-datagram chain.")
    return chain_bench.run_main("unix", lambda: bench(args))


if __name__ == "__main__":
    sys.exit(main())
