"""sand's Python zygote runtime (stdlib only).

The worker starts it by exec:

    python3 -u sand_runtime.py --app-dir DIR --module grains.py --handler NAME
                               [--reuse N] [--fork-on-demand]

with fd 3 a SOCK_SEQPACKET socket to the worker. It makes itself non-dumpable (so its
instances, which inherit that, cannot read it or each other through /proc, ptrace or
pidfd_getfd; without ctypes it refuses to load the grain), imports the grain's module once (the app
dir is on sys.path and is the cwd, so vendored packages work), says READY, then forks one
instance per call. The zygote itself is single-threaded and never runs a handler.

- The zygote never relays a call it can avoid. Each instance it forks gets a private stream
  socket, and the zygote sends the worker its end (SPARE, by SCM_RIGHTS) and closes its own
  copy: the worker writes calls straight to the instance, with no wake-up of the zygote. The
  worker asks for a spare (WANT) once the call that took the last one has its result, never
  while a call is being handed over (a fork takes a core for about a millisecond). A CALL
  that reaches the zygote (the worker held no spare) forks an instance on the spot, hands it
  over already serving that call, and relays the call.
- The zygote watches every instance by pidfd, reaps it when it ends, and reports each end
  (DIED, with the instance's number); KILL names an instance by that number. Numbers are
  never reused within a zygote's life, so a late KILL cannot hit a newer instance.
- An instance rehearses the call path once before it waits (see `rehearse`), so a call does
  not pay for the copy-on-write faults of the runtime's own code.
- An instance serves one call, or up to `--reuse N` calls, then exits.
- An instance closes its copy of fd 3 before any handler code runs, writes its result on its
  private socket (the worker takes there only the result of the call the instance holds), and
  then lingers until the worker closes the socket (it has read the result), so its exit never
  delays the reader and its DIED never overtakes its result.
- `--fork-on-demand` is the SAND baseline, for benchmarks: the worker holds no spares, so
  every call forks when it arrives, and the instance serves that one call.

The wire is documented in sdk/rust/src/wire.rs (crate sand-grain); keep the two equal.
"""

import gc
import json
import os
import select
import signal
import socket
import struct
import sys
import traceback

CALL, KILL, WANT, READY, LOAD_FAILED, DIED, SPARE = 1, 3, 4, 10, 11, 13, 14
MORE = 1
HEADER = struct.Struct("<BBI")
PIECE_BODY_MAX = 60 * 1024
CAPTURE_MAX = 64 * 1024
MESSAGE_MAX = 16 << 20
RESULT_HEAD = struct.Struct("<IIIIIQQ")
CALL_IDS = struct.Struct("<QQ")
PRIVATE_LEN = struct.Struct("<I")
SPARE_BODY = struct.Struct("<II")
DIED_BODY = struct.Struct("<IBi")
KILL_BODY = struct.Struct("<I")


def send_message(chan, kind, slot, body=b""):
    """Writes one message as datagrams of at most PIECE_BODY_MAX body bytes."""
    view = memoryview(body)
    while True:
        chunk, view = view[:PIECE_BODY_MAX], view[PIECE_BODY_MAX:]
        flags = MORE if len(view) else 0
        chan.sendmsg([HEADER.pack(kind, flags, slot), chunk])
        if not flags:
            return


class Next:
    """What `ctx.next` returns: the handler returns it to chain to `grain`."""

    __slots__ = ("grain", "value")

    def __init__(self, grain, value):
        self.grain = grain
        self.value = value


class FanOut:
    """What `ctx.fan_out` returns: the handler returns it to fan out and join."""

    __slots__ = ("branches", "join")

    def __init__(self, branches, join):
        self.branches = branches
        self.join = join


class Ctx:
    """The second argument of a handler: the call's identity, spelled as the HTTP API spells
    it (`exec` the execution's reference, `call` 16 hex digits, `attempt` a number), its place
    in the execution's trace (`trace`, a W3C traceparent, empty when not traced), and the ways
    to go on."""

    __slots__ = ("exec", "call", "attempt", "trace")

    def __init__(self, exec_ref, call, attempt, trace):
        self.exec = exec_ref
        self.call = "%016x" % call
        self.attempt = attempt
        self.trace = trace

    def next(self, grain, value):
        """Returns a marker: return it to run `grain` with `value` next."""
        return Next(grain, value)

    def fan_out(self, branches, join):
        """Returns a marker: return it to run each `(grain, value)` and then `join` with the
        list of their values, in order."""
        return FanOut([(g, v) for g, v in branches], join)


def encode_result(out):
    """The result document for what a handler returned."""
    try:
        if isinstance(out, Next):
            doc = {"next": [out.grain, out.value]}
        elif isinstance(out, FanOut):
            doc = {"fan_out": [[g, v] for g, v in out.branches], "join": out.join}
        else:
            doc = {"return": out}
        return json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError, RecursionError) as e:
        text = "the handler returned a value that is not JSON: %s: %s" % (type(e).__name__, e)
        return json.dumps({"error": text, "kind": "bad_output"}).encode()


def describe_exception(e):
    """'ValueError: text' followed by the traceback's last lines."""
    head = "".join(traceback.format_exception_only(type(e), e)).strip()
    frames = "".join(traceback.format_tb(e.__traceback__)[-5:])
    return (head + "\nTraceback (most recent call last):\n" + frames)[:8192]


def run_call(handler, body):
    try:
        n = body[0]
        exec_ref = bytes(body[1:1 + n]).decode("ascii", "replace")
        at = 1 + n
        m = body[at]
        trace = bytes(body[at + 1:at + 1 + m]).decode("ascii", "replace")
        at += 1 + m
        call, attempt = CALL_IDS.unpack_from(body, at)
        event = json.loads(bytes(body[at + CALL_IDS.size:]))
        out = handler(event, Ctx(exec_ref, call, attempt, trace))
    except BaseException as e:  # the handler's failure is the call's result
        return json.dumps({"error": describe_exception(e)}).encode()
    return encode_result(out)


def read_capture(fd):
    """The first CAPTURE_MAX bytes written to a capture file, and its total size; empties it."""
    total = os.fstat(fd).st_size
    head = os.pread(fd, min(total, CAPTURE_MAX), 0) if total else b""
    if total:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
    return head, total


def recv_private(sock):
    """The next message from the zygote on an instance's private socket, or None at EOF."""
    head = recv_exact(sock, PRIVATE_LEN.size)
    if head is None:
        return None
    (n,) = PRIVATE_LEN.unpack(head)
    return recv_exact(sock, n)


def recv_exact(sock, n):
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return buf


def libc_prctl():
    """libc's prctl, or None without ctypes."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (ImportError, OSError, AttributeError):
        return None


def parent_death_signal_setter(prctl):
    """A function that makes the calling process die with its parent, resolved once in the
    zygote so an instance pays only the syscall (None without ctypes: best effort)."""
    if prctl is None:
        return None
    PR_SET_PDEATHSIG = 1
    return lambda: prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def make_undumpable(prctl):
    """Makes this process non-dumpable, or raises: its instances must not read it."""
    PR_SET_DUMPABLE = 0x4
    if prctl is None:
        raise OSError("cannot make the zygote non-dumpable: ctypes is unavailable")
    import ctypes

    zero = ctypes.c_ulong(0)
    if prctl(PR_SET_DUMPABLE, zero, zero, zero, zero) != 0:
        raise OSError(ctypes.get_errno(), "cannot make the zygote non-dumpable")


def answer(handler, call, out_fd, err_fd, pid, served):
    """Runs one call (a CALL body) and returns its result frame's body, with the captured output
    and how many calls the instance served before it."""
    result = run_call(handler, call)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    out, out_total = read_capture(out_fd)
    err, err_total = read_capture(err_fd)
    if len(result) > MESSAGE_MAX - 2 * CAPTURE_MAX:
        text = "the result is %d bytes, above the %d byte limit" % (len(result), MESSAGE_MAX)
        result = json.dumps({"error": text, "kind": "bad_output"}).encode()
    head = RESULT_HEAD.pack(pid, served, len(result), len(out), len(err), out_total, err_total)
    return b"".join((head, result, out, err))


def rehearse(out_fd, err_fd):
    """Runs the call path once with a stand-in handler, sending nothing. In the zygote it
    makes what the path creates lazily exist before the fork; in an instance waiting for its
    call it copies the pages the path writes (allocator pools, free lists) while nobody
    waits, instead of during the call."""
    reference = b"0" * 48
    trace = b"00-" + b"0" * 32 + b"-" + b"0" * 16 + b"-01"
    ids = bytes([len(reference)]) + reference + bytes([len(trace)]) + trace + CALL_IDS.pack(0, 0)
    call = ids + b'{"rehearsal":[1,"two",3.5,null,true]}'
    answer(lambda event, ctx: ctx.next("rehearsal", event), memoryview(call), out_fd, err_fd, 0, 0)


def instance_main(sock, handler, calls_max):
    """One forked instance: serve up to calls_max calls from the private socket, answering each
    there, then wait for the worker to close it (it has read the last result), and exit."""
    out_fd = os.memfd_create("sand-stdout")
    err_fd = os.memfd_create("sand-stderr")
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    pid = os.getpid()
    rehearse(out_fd, err_fd)
    served = 0
    while served < calls_max:
        msg = recv_private(sock)
        if msg is None:
            os._exit(0)
        slot = PRIVATE_LEN.unpack_from(msg)[0]
        body = answer(handler, memoryview(msg)[PRIVATE_LEN.size:], out_fd, err_fd, pid, served)
        sock.sendall(private_frame(slot, body))
        served += 1
    while recv_private(sock) is not None:
        pass
    os._exit(0)


def private_frame(slot, body):
    """A frame on an instance's private socket: a CALL to it, or its result."""
    return PRIVATE_LEN.pack(PRIVATE_LEN.size + len(body)) + PRIVATE_LEN.pack(slot) + body


class Zygote:
    def __init__(self, chan, handler, reuse, prefork, prctl):
        self.chan = chan
        self.handler = handler
        self.reuse = reuse if prefork else 1
        self.live = {}  # pidfd -> (instance number, pid) of every instance not yet reaped
        self.by_number = {}  # instance number -> pid, for KILL
        self.numbered = 0  # the last instance number given
        self.partial = {}  # slot -> bytearray of a CALL still arriving
        self.poll = select.poll()
        self.die_with_parent = parent_death_signal_setter(prctl)
        self.poll.register(chan.fileno(), select.POLLIN)

    def hand_over(self, slot):
        """Forks an instance and sends the worker its socket (SPARE); returns our copy of the
        socket, which the caller closes (the worker's copy is then the only one)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            try:
                # Before any handler code: the instance keeps no way to the zygote's channel.
                self.chan.close()
                ours.close()
                for pidfd in self.live:
                    os.close(pidfd)
                if self.die_with_parent is not None:
                    self.die_with_parent()
                instance_main(theirs, self.handler, self.reuse)
            finally:
                os._exit(70)
        theirs.close()
        self.numbered = (self.numbered + 1) & 0xFFFFFFFF or 1
        number = self.numbered
        pidfd = os.pidfd_open(pid)
        self.live[pidfd] = (number, pid)
        self.by_number[number] = pid
        self.poll.register(pidfd, select.POLLIN)
        head = HEADER.pack(SPARE, 0, slot) + SPARE_BODY.pack(number, pid)
        try:
            socket.send_fds(self.chan, [head], [ours.fileno()])
        except OSError:
            self.shutdown()  # the worker is gone
        return ours

    def call(self, slot, body):
        """The worker held no spare for this call: fork one, hand it over already serving the
        call (SPARE with the call's slot, sent before the call so it reaches the worker
        before its result), and relay the call."""
        ours = self.hand_over(slot)
        try:
            ours.sendall(private_frame(slot, body))
        except OSError:
            pass  # it died: its DIED reports the call
        ours.close()

    def kill(self, number):
        pid = self.by_number.get(number)
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def instance_ended(self, pidfd):
        """An instance's pidfd is readable: it exited. Reap it and report it (DIED)."""
        number, pid = self.live.pop(pidfd)
        del self.by_number[number]
        self.poll.unregister(pidfd)
        os.close(pidfd)
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            status = None
        if status is not None and os.WIFSIGNALED(status):
            how, code = 1, os.WTERMSIG(status)
        else:
            how, code = 0, os.WEXITSTATUS(status) if status is not None else -1
        send_message(self.chan, DIED, 0, DIED_BODY.pack(number, how, code))

    def on_piece(self, piece):
        if len(piece) < HEADER.size:
            return
        kind, flags, slot = HEADER.unpack_from(piece)
        body = piece[HEADER.size:]
        if kind == CALL:
            buf = self.partial.pop(slot, None)
            if buf is None and not flags & MORE:
                self.call(slot, body)
                return
            buf = (buf or bytearray()) + body
            if len(buf) > MESSAGE_MAX:
                return  # the worker never sends this; drop it
            if flags & MORE:
                self.partial[slot] = buf
            else:
                self.call(slot, bytes(buf))
        elif kind == WANT:
            self.hand_over(0).close()
        elif kind == KILL and len(body) == KILL_BODY.size:
            self.kill(KILL_BODY.unpack(body)[0])

    def serve(self):
        # Objects that exist now are shared with every instance: keep the collector from
        # writing to them in instances (each write would copy a page).
        out_fd = os.memfd_create("sand-rehearsal")
        try:
            rehearse(out_fd, out_fd)
        finally:
            os.close(out_fd)
        gc.collect()
        gc.freeze()
        chan_fd = self.chan.fileno()
        while True:
            for fd, _events in self.poll.poll():
                if fd == chan_fd:
                    piece = self.chan.recv(HEADER.size + PIECE_BODY_MAX)
                    if not piece:
                        self.shutdown()
                    self.on_piece(piece)
                elif fd in self.live:
                    self.instance_ended(fd)

    def shutdown(self):
        for _number, pid in self.live.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os._exit(0)


def parse_args(argv):
    opts = {"reuse": 1, "prefork": True}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--fork-on-demand":
            opts["prefork"] = False
            i += 1
            continue
        if arg not in ("--app-dir", "--module", "--handler", "--reuse") or i + 1 >= len(argv):
            raise SystemExit("sand_runtime: bad argument %r" % arg)
        opts[arg[2:].replace("-", "_")] = argv[i + 1]
        i += 2
    for key in ("app_dir", "module", "handler"):
        if key not in opts:
            raise SystemExit("sand_runtime: --%s is required" % key.replace("_", "-"))
    opts["reuse"] = max(1, int(opts["reuse"]))
    return opts


def module_name(path):
    name = path[:-3] if path.endswith(".py") else path
    return name.replace("/", ".")


def load_handler(opts):
    import importlib

    app_dir = os.path.abspath(opts["app_dir"])
    os.chdir(app_dir)
    sys.path.insert(0, app_dir)
    module = importlib.import_module(module_name(opts["module"]))
    handler = getattr(module, opts["handler"], None)
    if not callable(handler):
        raise LookupError(
            "module %s has no function %r" % (opts["module"], opts["handler"])
        )
    return handler


def main():
    opts = parse_args(sys.argv[1:])
    chan = socket.socket(fileno=3)
    prctl = libc_prctl()
    try:
        make_undumpable(prctl)
        handler = load_handler(opts)
    except BaseException as e:
        send_message(chan, LOAD_FAILED, 0, describe_exception(e).encode())
        os._exit(1)
    send_message(chan, READY, 0, struct.pack("<I", os.getpid()))
    Zygote(chan, handler, opts["reuse"], opts["prefork"], prctl).serve()


if __name__ == "__main__":
    main()
