"""sand_client's tests: what it sends and how it reads answers, against a stand-in server; and,
with SAND_CLIENT_LIVE=1, the real thing against the gateway at SAND_GATEWAY serving the
example apps `pipeline` and `fanout` (`cargo test --release -p sand --test cluster
the_python_client` sets that up)."""

import http.server
import json
import os
import threading
import unittest
import uuid

from sand_client import ApiError, Client, GrainFailed, StillRunning, _is_loopback

LIVE = os.environ.get("SAND_CLIENT_LIVE") == "1"


class StandIn(http.server.BaseHTTPRequestHandler):
    """Answers with the next canned (status, body) and records each request."""

    answers = []
    seen = []

    def do_POST(self):
        self._answer(self.rfile.read(int(self.headers.get("Content-Length", 0))))

    def do_GET(self):
        self._answer(b"")

    def _answer(self, body):
        StandIn.seen.append((self.command, self.path, dict(self.headers), body))
        status, reply = StandIn.answers.pop(0)
        data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class WhatTheClientSends(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
        threading.Thread(target=cls.server.serve_forever, daemon=True).start()
        cls.url = "http://127.0.0.1:%d" % cls.server.server_address[1]

    @classmethod
    def tearDownClass(cls):
        cls.server.shutdown()
        cls.server.server_close()

    def setUp(self):
        StandIn.answers.clear()
        StandIn.seen.clear()
        self.sand = Client(self.url, token="t0k3n")

    def test_a_synchronous_invoke_sends_the_input_key_token_and_wait(self):
        StandIn.answers.append((200, {"execution": "e1", "output": 49}))
        self.assertEqual(self.sand.invoke("pipeline", 3, wait=2.5, idempotency_key="k-1"), 49)
        method, path, headers, body = StandIn.seen[0]
        self.assertEqual((method, path), ("POST", "/v1/apps/pipeline/invoke?wait=2.5"))
        self.assertEqual(json.loads(body), 3)
        self.assertEqual(headers["Authorization"], "Bearer t0k3n")
        self.assertEqual(headers["Idempotency-Key"], "k-1")
        self.assertEqual(headers["Content-Type"], "application/json")

    def test_an_async_invoke_answers_the_reference(self):
        StandIn.answers.append((202, {"execution": "e2"}))
        self.assertEqual(self.sand.invoke_async("pipeline", {"n": 1}), "e2")
        self.assertEqual(StandIn.seen[0][1], "/v1/apps/pipeline/invoke?async=true")
        self.assertNotIn("Idempotency-Key", StandIn.seen[0][2])

    def test_a_wait_that_runs_out_and_a_failure_are_raised(self):
        StandIn.answers.append((202, {"execution": "e3"}))
        with self.assertRaises(StillRunning) as ran_out:
            self.sand.invoke("pipeline", 1)
        self.assertEqual(ran_out.exception.execution, "e3")
        failure = {"execution": "e4", "error": {"kind": "raised", "message": "ValueError: no"}}
        StandIn.answers.append((200, failure))
        with self.assertRaises(GrainFailed) as failed:
            self.sand.invoke("pipeline", 1)
        self.assertEqual((failed.exception.kind, failed.exception.message), ("raised", "ValueError: no"))

    def test_a_refusal_carries_its_status_and_code(self):
        StandIn.answers.append((404, {"error": {"code": "unknown_app", "message": "no app x"}}))
        with self.assertRaises(ApiError) as refused:
            self.sand.invoke("x", 1)
        self.assertEqual((refused.exception.status, refused.exception.code), (404, "unknown_app"))

    def test_an_answer_that_is_not_json_is_a_clear_error(self):
        StandIn.answers.append((200, b"<html>a proxy's page</html>"))
        with self.assertRaises(ApiError) as garbled:
            self.sand.invoke("pipeline", 1)
        self.assertEqual((garbled.exception.status, garbled.exception.code), (200, "bad_answer"))
        self.assertIn("not JSON", garbled.exception.message)

    def test_a_name_cannot_reach_another_route(self):
        StandIn.answers.append((404, {"error": {"code": "unknown_app", "message": "?"}}))
        with self.assertRaises(ApiError):
            self.sand.invoke("../executions/x?async=true#", 1)
        self.assertEqual(
            StandIn.seen[0][1], "/v1/apps/..%2Fexecutions%2Fx%3Fasync%3Dtrue%23/invoke?wait=30.0"
        )

    def test_result_polls_until_the_execution_ends(self):
        running = {"execution": "e5", "app": "pipeline", "status": "running", "calls": []}
        done = dict(running, status="succeeded", output=49)
        StandIn.answers.extend([(200, running), (200, running), (200, done)])
        self.assertEqual(self.sand.result("e5", poll=0.001), 49)
        self.assertEqual([s[1] for s in StandIn.seen], ["/v1/executions/e5"] * 3)

    def test_a_trace_reads_as_calls_with_their_inputs_outputs_and_edges(self):
        call = {
            "call": "00000000000000aa", "grain": "split", "attempt": 4294967296, "worker": 1,
            "via": "gateway", "reason": "recovery", "recovery": True, "dispatched_ms": 1,
            "started_ms": 2, "ended_ms": 3, "error": None, "stdout": "hi\n", "stderr": "",
            "input": "\"a b\"", "input_cut": False, "output": None, "output_cut": False,
            "emitted": ["00000000000000bb", "00000000000000cc"],
        }
        body = {"execution": "e6", "app": "fanout", "status": "running", "calls": [call]}
        StandIn.answers.append((200, body))
        (read,) = self.sand.logs("e6")
        self.assertEqual((read.grain, read.reason, read.recovery), ("split", "recovery", True))
        self.assertEqual((read.input, read.output), ('"a b"', None))
        self.assertEqual(read.emitted, ["00000000000000bb", "00000000000000cc"])

    def test_a_bad_wait_is_refused_before_sending(self):
        for wait in (-1, float("nan"), float("inf")):
            with self.assertRaises(ValueError):
                self.sand.invoke("pipeline", 1, wait=wait)
        self.assertEqual(StandIn.seen, [])

    def test_only_a_gateway_on_this_machine_may_get_the_dev_token(self):
        for local in ("http://127.0.0.1:8080", "https://localhost/v1", "http://[::1]:80"):
            self.assertTrue(_is_loopback(local), local)
        for remote in ("http://10.0.0.1:8080", "https://localhost.evil.example", "http://[2001:db8::1]"):
            self.assertFalse(_is_loopback(remote), remote)


@unittest.skipUnless(LIVE, "needs SAND_CLIENT_LIVE=1 and a gateway at SAND_GATEWAY")
class AgainstAGateway(unittest.TestCase):
    def setUp(self):
        self.sand = Client()

    def test_a_chain_and_a_fan_out_answer(self):
        self.assertEqual(self.sand.invoke("pipeline", 3), 49)
        self.assertEqual(
            self.sand.invoke("fanout", "serverless chained functions"), {"words": 3, "letters": 26}
        )

    def test_an_async_invocation_is_followed_to_its_result_and_logs(self):
        key = "py-" + uuid.uuid4().hex
        ref = self.sand.invoke_async("pipeline", 4, idempotency_key=key)
        self.assertEqual(self.sand.invoke_async("pipeline", 4, idempotency_key=key), ref)
        self.assertEqual(self.sand.result(ref, timeout=30), 81)
        execution = self.sand.status(ref)
        self.assertEqual((execution.app, execution.status, execution.output), ("pipeline", "succeeded", 81))
        with self.assertRaises(ApiError) as reused:
            self.sand.invoke_async("pipeline", 5, idempotency_key=key)
        self.assertEqual((reused.exception.status, reused.exception.code), (422, "idempotency_key_reused"))

    def test_logs_name_every_grain_of_the_chain(self):
        ref = self.sand.invoke_async("pipeline", 1)
        self.sand.result(ref, timeout=30)
        # Workers trace their runs in batches, best effort: the last may land after the answer.
        for _ in range(100):
            grains = [call.grain for call in self.sand.logs(ref)]
            if len(grains) >= 3:
                break
            threading.Event().wait(0.05)
        self.assertEqual(sorted(grains), ["double", "inc", "square"])

    def test_refusals_are_api_errors(self):
        with self.assertRaises(ApiError) as unknown:
            self.sand.invoke("no-such-app", 1)
        self.assertEqual((unknown.exception.status, unknown.exception.code), (404, "unknown_app"))
        with self.assertRaises(ApiError) as forged:
            self.sand.status("0" * 48)
        self.assertEqual(forged.exception.code, "unknown_execution")


if __name__ == "__main__":
    unittest.main()
