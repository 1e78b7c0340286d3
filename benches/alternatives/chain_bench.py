"""The measurement shared by every baseline script: the workload, the two phases, the report.

The workload is sand's: a chain of five steps where step i (1..5) adds i to its input, so an
input x must come back as x + 15. Every answer is checked; a wrong one aborts the run as a
failure and is never counted as a sample.

A script hands this module a *client factory*: a module-level function
``factory(client_index, config) -> (run_chain, close)`` where ``run_chain(x)`` runs one chain
and returns its answer. The latency phase runs chains one after the other from this process;
the throughput phase runs C clients (threads here, or processes started with the ``spawn``
method so that no process with threads is ever forked) back to back for S seconds between a
common start and end instant, and counts the chains that completed inside that window.

Only the standard library is used, so the Unix-datagram floor runs with any python3.
"""

import argparse
import json
import multiprocessing
import os
import queue
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback

STEPS = 5
CHAIN_SUM = sum(range(1, STEPS + 1))  # 15

# Exit statuses of a baseline script.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNAVAILABLE = 3

# How long clients get to connect and run their first chain before the throughput phase gives
# up, and how far after the window's end the parent waits for their counts.
CLIENT_READY_TIMEOUT_S = 120.0
CLIENT_REPORT_SLACK_S = 60.0


class WrongAnswer(Exception):
    """A chain returned something other than its input plus 15."""


class BenchFailure(Exception):
    """A phase could not complete (timeout, crashed component, wrong answer)."""


class Unavailable(Exception):
    """The system under test cannot be imported or started here."""


def log(message):
    """Writes one progress line to stderr (stdout carries only the JSON report)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(description, argv=None):
    """Parses the options every baseline script takes."""
    return argument_parser(description).parse_args(argv)


def argument_parser(description):
    """The parser of the options every baseline script takes, for a script to add its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", type=positive_int, default=300,
                        help="sequential single-client chains measured (default 300)")
    parser.add_argument("--warmup", type=non_negative_int, default=30,
                        help="chains run and discarded before the latency phase (default 30)")
    parser.add_argument("--clients", type=positive_int, default=8,
                        help="concurrent clients in the throughput phase (default 8)")
    parser.add_argument("--seconds", type=non_negative_float, default=10.0,
                        help="length of the throughput window in seconds (default 10; "
                             "0: no throughput phase)")
    return parser


def positive_int(text):
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not >= 1")
    return value


def non_negative_int(text):
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not >= 0")
    return value


def non_negative_float(text):
    """argparse type: a number >= 0."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} is not >= 0")
    return value


def check_answer(x, answer):
    """Raises WrongAnswer unless ``answer`` is ``x + 15``."""
    if answer != x + CHAIN_SUM:
        raise WrongAnswer(f"chain({x}) returned {answer!r}, expected {x + CHAIN_SUM}")


def terminate_on_sigterm():
    """Turns SIGTERM into SystemExit so that every ``finally`` teardown runs."""
    def handler(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)


def measure_latency(run_chain, runs, warmup):
    """Runs ``warmup`` then ``runs`` sequential chains; returns the latency summary in ms."""
    for x in range(warmup):
        check_answer(x, run_chain(x))
    samples_ms = []
    for n in range(runs):
        x = warmup + n
        start = time.perf_counter()
        answer = run_chain(x)
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        check_answer(x, answer)
        samples_ms.append(elapsed_ms)
    return summarize(samples_ms, warmup)


def summarize(samples_ms, warmup):
    """Median, p99 (inclusive quantile), mean, min and max of the samples, and the samples
    themselves in the order they were taken (for merging rounds), in ms. The samples are
    rounded to 0.1 µs first and every figure is computed from them, so that the figures of a
    report agree with its samples (rounding twice would not)."""
    samples_ms = [round(sample, 4) for sample in samples_ms]
    p99 = (statistics.quantiles(samples_ms, n=100, method="inclusive")[98]
           if len(samples_ms) > 1 else samples_ms[0])
    return {
        "runs": len(samples_ms),
        "warmup": warmup,
        "median": round(statistics.median(samples_ms), 3),
        "p99": round(p99, 3),
        "mean": round(statistics.fmean(samples_ms), 3),
        "min": round(min(samples_ms), 3),
        "max": round(max(samples_ms), 3),
        "samples": samples_ms,
    }


def client_input(client_index, n):
    """The n-th input of a throughput client: distinct across clients, varying per chain."""
    return (client_index + 1) * 10_000_000 + n


def _client_loop(factory, config, client_index, ready, window, result, stop):
    """Body of one throughput client (a thread or a spawned process).

    ``ready(message)`` reports that the client connected and ran one checked chain (or why not);
    ``window()`` blocks for the (start, end) monotonic instants; ``result(message)`` reports the
    count; ``stop`` (an Event) ends the loop early when the parent gives up. CLOCK_MONOTONIC is
    system-wide on Linux, so instants are comparable across processes.
    """
    try:
        run_chain, close = factory(client_index, config)
    except Exception as error:  # reported to the parent, which fails the phase
        ready(("error", f"client {client_index} setup: {error!r}"))
        return
    try:
        try:
            x = client_input(client_index, 0)
            check_answer(x, run_chain(x))
        except Exception as error:
            ready(("error", f"client {client_index} first chain: {error!r}"))
            return
        ready(("ready", client_index))
        start, end = window()
        if start is None:
            return
        time.sleep(max(0.0, start - time.monotonic()))
        chains = 0
        n = 1
        try:
            while time.monotonic() < end and not stop.is_set():
                x = client_input(client_index, n)
                answer = run_chain(x)
                finished = time.monotonic()
                check_answer(x, answer)
                if finished <= end:
                    chains += 1
                n += 1
        except Exception as error:
            result(("error", f"client {client_index} chain {n}: {error!r}"))
            return
        result(("count", chains))
    finally:
        close()


def _process_client(factory, config, client_index, ready_queue, window_conn, result_queue,
                    stop):
    """Entry point of a spawned client process."""
    # The parent owns teardown; a Ctrl-C on the terminal must not leave tracebacks here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def window():
        if not window_conn.poll(CLIENT_READY_TIMEOUT_S + 10.0):
            return None, None
        return window_conn.recv()

    _client_loop(factory, config, client_index, ready_queue.put, window, result_queue.put,
                 stop)


def measure_throughput(factory, config, clients, seconds, mode, chain_timeout_s):
    """Runs ``clients`` clients back to back for ``seconds``; returns the throughput summary.

    ``mode`` is "threads" or "processes". Raises BenchFailure if any client fails, answers
    wrongly or does not report in time. With ``seconds`` 0 no client runs: the summary is of
    an empty window (a run that measures latency only).
    """
    if seconds == 0:
        return {"clients": clients, "client_mode": mode, "seconds": 0, "chains": 0,
                "chains_per_s": 0.0}
    if mode == "processes":
        context = multiprocessing.get_context("spawn")
        ready_queue = context.Queue()
        result_queue = context.Queue()
        pipes = [context.Pipe(duplex=False) for _ in range(clients)]
        stop = context.Event()
        workers = [context.Process(target=_process_client,
                                   args=(factory, config, i, ready_queue, pipes[i][0],
                                         result_queue, stop),
                                   daemon=True)
                   for i in range(clients)]

        def send_window(window):
            for _reader, writer in pipes:
                writer.send(window)
    elif mode == "threads":
        ready_queue = queue.Queue()
        result_queue = queue.Queue()
        window_box = {}
        window_set = threading.Event()
        stop = threading.Event()

        def thread_window():
            if not window_set.wait(CLIENT_READY_TIMEOUT_S + 10.0):
                return None, None
            return window_box["window"]

        workers = [threading.Thread(target=_client_loop,
                                    args=(factory, config, i, ready_queue.put, thread_window,
                                          result_queue.put, stop),
                                    daemon=True)
                   for i in range(clients)]

        def send_window(window):
            window_box["window"] = window
            window_set.set()
    else:
        raise ValueError(f"unknown client mode {mode!r}")

    try:
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + CLIENT_READY_TIMEOUT_S
        for _ in range(clients):
            message = _get_before(ready_queue, deadline, "a client to get ready")
            if message[0] == "error":
                raise BenchFailure(message[1])
        start = time.monotonic() + 0.2
        end = start + seconds
        send_window((start, end))
        chains = 0
        deadline = end + chain_timeout_s + CLIENT_REPORT_SLACK_S
        for _ in range(clients):
            message = _get_before(result_queue, deadline, "a client's count")
            if message[0] == "error":
                raise BenchFailure(message[1])
            chains += message[1]
    finally:
        stop.set()
        if mode == "processes":
            send_window((None, None))  # releases clients still waiting for a window
            for worker in workers:
                if worker.pid is None:  # never started
                    continue
                worker.join(timeout=10.0)
                if worker.is_alive():
                    worker.kill()
                    worker.join(timeout=5.0)
        else:
            send_window((None, None))
            for worker in workers:
                if worker.ident is not None:
                    worker.join(timeout=chain_timeout_s + 5.0)
    return {
        "clients": clients,
        "client_mode": mode,
        "seconds": int(seconds) if float(seconds).is_integer() else seconds,
        "chains": chains,
        "chains_per_s": round(chains / seconds, 1),
    }


def _get_before(queue_, deadline, what):
    """Takes one message from a queue, or raises BenchFailure once ``deadline`` passes."""
    remaining = deadline - time.monotonic()
    try:
        return queue_.get(timeout=max(0.01, remaining))
    except queue.Empty:
        raise BenchFailure(f"timed out waiting for {what}") from None


def free_loopback_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_group(argv, log_path, **kwargs):
    """Starts a subprocess in its own session (and so process group), output to ``log_path``."""
    log_file = open(log_path, "ab")
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
    finally:
        log_file.close()


def stop_group(process, name, grace_s=10.0, stop_signal=signal.SIGTERM):
    """Stops a process started by ``start_group`` and everything in its process group.

    ``stop_signal`` (SIGTERM unless the process wants another to shut down) to the group, a
    wait of ``grace_s``, then SIGKILL to the group. The group id is the leader's pid, so this
    reaches only processes this script started (and their children).
    """
    if process is None:
        return
    pgid = process.pid
    try:
        os.killpg(pgid, stop_signal)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        log(f"{name} (pid {process.pid}) ignored {signal.Signals(stop_signal).name} for "
            f"{grace_s} s; killing its group")
    # Children of the leader (e.g. a prefork pool) may outlive it briefly: wait for the group
    # to empty, then kill whatever is left.
    group_deadline = time.monotonic() + grace_s
    while _group_alive(pgid) and time.monotonic() < group_deadline:
        time.sleep(0.05)
    if _group_alive(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        process.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        log(f"{name} (pid {process.pid}) survived SIGKILL")


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def tail(path, lines=20):
    """The last lines of a log file, for error messages."""
    try:
        with open(path, "r", errors="replace") as handle:
            return "".join(handle.readlines()[-lines:]).rstrip()
    except OSError as error:
        return f"(no log: {error})"


def emit(report):
    """Prints the one JSON report on stdout."""
    print(json.dumps(report), flush=True)


def run_main(system, body):
    """Runs ``body()`` (which returns the report), mapping failures to the JSON contract.

    Unavailable -> {"system", "unavailable"} and exit 3; any other failure -> {"system",
    "error"} and exit 1. The traceback, if any, goes to stderr.
    """
    terminate_on_sigterm()
    try:
        report = body()
    except Unavailable as reason:
        emit({"system": system, "unavailable": str(reason)})
        return EXIT_UNAVAILABLE
    except (BenchFailure, WrongAnswer) as error:
        emit({"system": system, "error": str(error)})
        return EXIT_FAILED
    except SystemExit as stop:
        if stop.code in (0, None):
            raise
        emit({"system": system, "error": f"stopped by signal (exit {stop.code})"})
        return EXIT_FAILED
    except KeyboardInterrupt:
        emit({"system": system, "error": "interrupted"})
        return EXIT_FAILED
    except Exception as error:  # an unexpected bug: still one JSON line, details on stderr
        traceback.print_exc(file=sys.stderr)
        emit({"system": system, "error": f"unexpected {type(error).__name__}: {error}"})
        return EXIT_FAILED
    emit(report)
    return EXIT_OK
