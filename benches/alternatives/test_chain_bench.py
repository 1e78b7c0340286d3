"""Tests of the shared measurement and of the scripts' options and "unavailable" reports
(stdlib only, no Celery, Ray, Redis or Restate needed).

Run from this folder: python3 -m unittest -v test_chain_bench
"""

import io
import json
import os
import subprocess
import sys
import tempfile
import time
import unittest
from contextlib import redirect_stdout

import chain_bench

HERE = os.path.dirname(os.path.abspath(__file__))


def right_factory(_client_index, delay_s):
    """A client whose chain answers right after ``delay_s``."""
    def run_chain(x):
        time.sleep(delay_s)
        return x + 15
    return run_chain, lambda: None


def wrong_factory(client_index, _config):
    """A client whose second chain answers wrongly (the first, the readiness check, is right)."""
    calls = []

    def run_chain(x):
        calls.append(x)
        return x + 15 if len(calls) == 1 else x + 14
    return run_chain, lambda: None


def failing_setup_factory(client_index, _config):
    """A client that cannot connect."""
    raise ConnectionRefusedError(f"client {client_index}: nothing listens")


class AnswerTest(unittest.TestCase):
    def test_right_answer_passes_and_wrong_answer_raises(self):
        chain_bench.check_answer(7, 22)
        with self.assertRaises(chain_bench.WrongAnswer):
            chain_bench.check_answer(7, 21)
        with self.assertRaises(chain_bench.WrongAnswer):
            chain_bench.check_answer(7, "22")

    def test_client_inputs_differ_across_clients_and_chains(self):
        inputs = {chain_bench.client_input(c, n) for c in range(8) for n in range(1000)}
        self.assertEqual(len(inputs), 8000)


class LatencyTest(unittest.TestCase):
    def test_runs_warmup_then_measures_each_input_once(self):
        seen = []

        def run_chain(x):
            seen.append(x)
            return x + 15
        summary = chain_bench.measure_latency(run_chain, runs=20, warmup=5)
        self.assertEqual(seen, list(range(25)))
        self.assertEqual(summary["runs"], 20)
        self.assertEqual(summary["warmup"], 5)
        self.assertLessEqual(summary["min"], summary["median"])
        self.assertLessEqual(summary["median"], summary["p99"])
        self.assertLessEqual(summary["p99"], summary["max"])

    def test_a_wrong_answer_fails_the_phase(self):
        with self.assertRaises(chain_bench.WrongAnswer):
            chain_bench.measure_latency(lambda x: x + 15 if x < 10 else 0, runs=20, warmup=2)

    def test_the_summary_carries_every_sample_in_order(self):
        delays = iter([0.004, 0.001, 0.003])

        def run_chain(x):
            time.sleep(next(delays, 0.0))
            return x + 15
        summary = chain_bench.measure_latency(run_chain, runs=3, warmup=0)
        samples = summary["samples"]
        self.assertEqual(len(samples), summary["runs"])
        self.assertGreater(samples[0], samples[1])
        self.assertLess(samples[1], samples[2])
        self.assertEqual((round(min(samples), 3), round(max(samples), 3)),
                         (summary["min"], summary["max"]))
        report = json.loads(json.dumps({"latency_ms": summary}))
        self.assertEqual(report["latency_ms"]["samples"], samples)

    def test_the_figures_agree_with_the_samples_kept(self):
        # 1.07151 rounds to 1.072, but its kept sample 1.0715 rounds to 1.071.
        summary = chain_bench.summarize([1.07151, 4.0], warmup=0)
        self.assertEqual(summary["samples"], [1.0715, 4.0])
        self.assertEqual(summary["min"], round(min(summary["samples"]), 3))

    def test_summary_statistics(self):
        summary = chain_bench.summarize([float(v) for v in range(1, 101)], warmup=0)
        self.assertEqual(summary["median"], 50.5)
        self.assertEqual(summary["mean"], 50.5)
        self.assertEqual(summary["p99"], 99.01)
        self.assertEqual((summary["min"], summary["max"]), (1.0, 100.0))


class ThroughputTest(unittest.TestCase):
    def check_counts(self, mode):
        # 3 clients, 10 ms chains, 0.5 s: at most 50 chains each, and well over half of that.
        summary = chain_bench.measure_throughput(right_factory, 0.01, 3, 0.5, mode, 5.0)
        self.assertEqual(summary["client_mode"], mode)
        self.assertLessEqual(summary["chains"], 150)
        self.assertGreater(summary["chains"], 60)
        self.assertEqual(summary["chains_per_s"], round(summary["chains"] / 0.5, 1))

    def test_counts_chains_in_the_window_with_threads(self):
        self.check_counts("threads")

    def test_counts_chains_in_the_window_with_processes(self):
        self.check_counts("processes")

    def test_zero_seconds_runs_no_client(self):
        summary = chain_bench.measure_throughput(failing_setup_factory, None, 4, 0, "processes",
                                                 5.0)
        self.assertEqual((summary["seconds"], summary["chains"], summary["chains_per_s"]),
                         (0, 0, 0.0))
        self.assertEqual(chain_bench.parse_args("demo", ["--seconds", "0"]).seconds, 0.0)

    def test_a_wrong_answer_fails_the_phase(self):
        for mode in ("threads", "processes"):
            with self.subTest(mode=mode):
                with self.assertRaisesRegex(chain_bench.BenchFailure, "expected"):
                    chain_bench.measure_throughput(wrong_factory, None, 2, 0.3, mode, 5.0)

    def test_a_client_that_cannot_connect_fails_the_phase(self):
        with self.assertRaisesRegex(chain_bench.BenchFailure, "nothing listens"):
            chain_bench.measure_throughput(failing_setup_factory, None, 2, 0.3, "processes",
                                           5.0)


class ReportTest(unittest.TestCase):
    def run_main(self, body):
        out = io.StringIO()
        with redirect_stdout(out):
            status = chain_bench.run_main("demo", body)
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 1, "exactly one JSON line on stdout")
        return status, json.loads(lines[0])

    def test_unavailable_exits_3_with_the_reason(self):
        def body():
            raise chain_bench.Unavailable("no broker")
        self.assertEqual(self.run_main(body), (3, {"system": "demo", "unavailable": "no broker"}))

    def test_failure_exits_1_with_the_error(self):
        def body():
            chain_bench.check_answer(0, 14)
        status, report = self.run_main(body)
        self.assertEqual(status, 1)
        self.assertIn("expected 15", report["error"])

    def test_success_prints_the_report(self):
        self.assertEqual(self.run_main(lambda: {"system": "demo", "ok": 1}),
                         (0, {"system": "demo", "ok": 1}))


class RestateScriptTest(unittest.TestCase):
    """restate_chain.py up to the point where it would start a server: no network needed."""

    def run_script(self, *args, fake_packages=(), path="/usr/bin:/bin"):
        """Runs the script; ``fake_packages`` are importable empty stand-ins, and the real
        packages are hidden. Returns (status, stdout, stderr).

        The interpreter is this one's real file: run through a venv's link, it would find the
        venv's restate-server."""
        with tempfile.TemporaryDirectory() as modules:
            for name in ("restate", "hypercorn"):
                stand_in = "" if name in fake_packages else f"raise ImportError('no {name} here')"
                with open(os.path.join(modules, f"{name}.py"), "w") as module:
                    module.write(stand_in + "\n")
            env = {"PATH": path, "PYTHONPATH": modules, "PYTHONDONTWRITEBYTECODE": "1"}
            script = os.path.join(HERE, "restate_chain.py")
            done = subprocess.run([os.path.realpath(sys.executable), "-S", script, *args],
                                  capture_output=True, text=True, env=env, timeout=60)
        return done.returncode, done.stdout, done.stderr

    def test_the_shape_is_required_and_checked(self):
        for args in ((), ("--shape", "fan-out"), ("--shape", "run", "--runs", "0")):
            with self.subTest(args=args):
                status, out, err = self.run_script(*args)
                self.assertEqual(status, 2)
                self.assertEqual(out, "")
                self.assertIn("usage:", err)

    def test_no_sdk_exits_3_with_the_reason(self):
        status, out, _err = self.run_script("--shape", "handlers")
        self.assertEqual(status, 3)
        report = json.loads(out)
        self.assertEqual(report["system"], "restate-handlers")
        self.assertIn("no restate here", report["unavailable"])

    def test_no_server_exits_3_with_the_reason(self):
        with tempfile.TemporaryDirectory() as empty:
            status, out, _err = self.run_script("--shape", "run",
                                                fake_packages=("restate", "hypercorn"),
                                                path=empty)
        self.assertEqual(status, 3)
        self.assertEqual(json.loads(out), {
            "system": "restate-run",
            "unavailable": "no restate-server in the venv or on PATH (run setup.sh)"})


if __name__ == "__main__":
    unittest.main()
