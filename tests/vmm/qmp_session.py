#!/usr/bin/env python3
"""vmm/qmp-session: a real lazymig-vmm's management socket, driven by two clients that
share no code with lazymig-vmm: socat, and a QMP client written here on Python's
standard library. Messages are compared byte for byte with what QEMU's QMP
specification (docs/interop/qmp-spec) shows: greeting, refusal before negotiation,
negotiation, the documented parse error, every command with its id echoed, and events
with timestamps, to every negotiated client and to no other.

Usage: qmp_session.py LAZYMIG_VMM VERSION   (meson passes both; exit 0 = pass, 1 = fail)
"""
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time

TIMEOUT = 30.0  # seconds for any one answer; a failure detector, not a speed check


def fail(what):
    print(f"vmm/qmp-session: FAIL: {what}", file=sys.stderr)
    sys.exit(1)


def expect(got, want, what):
    if got != want:
        fail(f"{what}:\n  got  {got!r}\n  want {want!r}")


class Client:
    """A QMP client: raw bytes in and out, one CRLF-terminated message at a time."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self.buf = b""

    def send(self, text):
        self.sock.sendall(text.encode() + b"\n")

    def read(self):
        """The next message, CRLF included (bytes)."""
        deadline = time.monotonic() + TIMEOUT
        while b"\r\n" not in self.buf:
            if time.monotonic() > deadline:
                fail(f"no complete message within {TIMEOUT} s (have {self.buf!r})")
            chunk = self.sock.recv(65536)
            if not chunk:
                fail(f"the server closed the connection (have {self.buf!r})")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        if b"\n" in line:
            fail(f"a bare LF inside a message: {line!r}")
        return line + b"\r\n"

    def pending(self, wait):
        """True when bytes arrive within `wait` seconds (used only to prove absence)."""
        if self.buf:
            return True
        r, _, _ = select.select([self.sock], [], [], wait)
        return bool(r)

    def close(self):
        self.sock.close()


def start_vm(vmm, tmp):
    sock = os.path.join(tmp, "vm.sock")
    proc = subprocess.Popen([vmm, "run", "--memory", "64M", "--vcpus", "2", "--workload", "idle", "--qmp", sock],
                            stdout=subprocess.PIPE, stderr=open(os.path.join(tmp, "vm.log"), "w"))
    # Raw reads: a buffered reader could swallow "ready" while select() waits for more.
    fd, out = proc.stdout.fileno(), b""
    deadline = time.monotonic() + TIMEOUT
    while b"\nready\n" not in b"\n" + out:
        r, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            proc.kill()
            fail(f"lazymig-vmm printed no 'ready' within {TIMEOUT} s (stdout {out!r})")
        chunk = os.read(fd, 4096)
        if not chunk:
            fail(f"lazymig-vmm exited before 'ready' (rc {proc.wait()}, stdout {out!r})")
        out += chunk
    return proc, sock


def greeting_bytes(version):
    major, minor, micro = (int(x) for x in version.split("."))
    return ('{"QMP": {"version": {"qemu": {"micro": %d, "minor": %d, "major": %d}, "package": "lazymig %s"}, '
            '"capabilities": []}}\r\n' % (micro, minor, major, version)).encode()


REFUSED = b'{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with \'qmp_capabilities\'"}}\r\n'
RETURN_EMPTY = b'{"return": {}}\r\n'
EVENT = re.compile(rb'^\{"event": "([A-Z_]+)", (?:"data": (\{.*\}), )?"timestamp": \{"seconds": (\d+), "microseconds": (\d+)\}\}\r\n$')


def check_event(msg, name):
    m = EVENT.match(msg)
    if not m:
        fail(f"not a QMP event in QEMU's layout: {msg!r}")
    expect(m.group(1).decode(), name, "event name")
    seconds, micro = int(m.group(3)), int(m.group(4))
    if not (0 <= micro < 1_000_000):
        fail(f"timestamp microseconds out of range: {msg!r}")
    if abs(seconds + micro / 1e6 - time.time()) > 60:
        fail(f"timestamp is not now: {msg!r}")


def read_reply_and_event(c, reply, event):
    """The reply and the event the command caused, in whichever order they come."""
    got = [c.read(), c.read()]
    replies = [m for m in got if not m.startswith(b'{"event"')]
    events = [m for m in got if m.startswith(b'{"event"')]
    if len(replies) != 1 or len(events) != 1:
        fail(f"want one reply and one {event} event, got {got!r}")
    expect(replies[0], reply, f"reply with the {event} event")
    check_event(events[0], event)


def socat_session(path, version):
    """socat as the client: the whole conversation in one go, the answer read back."""
    requests = ('{"execute": "query-status"}\n'
                '{"execute": "qmp_capabilities"}\n'
                '{"execute": "query-version", "id": "socat-1"}\n')
    out = subprocess.run(["socat", "-t", "10", "-", f"UNIX-CONNECT:{path}"], input=requests.encode(),
                         capture_output=True, timeout=TIMEOUT)
    if out.returncode != 0:
        fail(f"socat exited {out.returncode}: {out.stderr.decode()}")
    major, minor, micro = (int(x) for x in version.split("."))
    want = (greeting_bytes(version) + REFUSED + RETURN_EMPTY +
            ('{"return": {"package": "lazymig %s", "qemu": {"major": %d, "micro": %d, "minor": %d}}, "id": "socat-1"}\r\n'
             % (version, major, micro, minor)).encode())
    expect(out.stdout, want, "socat session")
    print("socat: greeting, refusal, negotiation, query-version: byte for byte")


def python_session(path, version):
    c = Client(path)
    expect(c.read(), greeting_bytes(version), "greeting")
    # Capabilities negotiation mode: every other command is refused, QEMU's way; a
    # capability the greeting did not offer is refused too.
    c.send('{ "execute": "stop" }')
    expect(c.read(), REFUSED, "stop before qmp_capabilities")
    c.send('{ "execute": "query-status", "id": 1 }')
    expect(c.read(), REFUSED[:-3] + b', "id": 1}\r\n', "query-status before qmp_capabilities, with id")
    c.send('{ "execute": "qmp_capabilities", "arguments": { "enable": ["oob"] } }')
    expect(c.read(), b'{"error": {"class": "GenericError", "desc": "Capability oob not available"}}\r\n', "enable oob")
    c.send('{ "execute": "qmp_capabilities" }')
    expect(c.read(), RETURN_EMPTY, "qmp_capabilities")
    c.send('{ "execute": "qmp_capabilities" }')
    expect(c.read(), b'{"error": {"class": "CommandNotFound", "desc": '
                     b'"Capabilities negotiation is already complete, command ignored"}}\r\n', "second qmp_capabilities")

    # The spec's examples that apply here.
    c.send('{ "execute": }')
    expect(c.read(), b'{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}\r\n', "parse error")
    c.send('{ "execute": "query-kvm", "id": "example" }')
    expect(c.read(), b'{"error": {"class": "CommandNotFound", "desc": "The command query-kvm has not been found"}, '
                     b'"id": "example"}\r\n', "unknown command with id")

    # Events reach every negotiated client, and none that has not negotiated.
    other = Client(path)
    expect(other.read(), greeting_bytes(version), "second client's greeting")
    other.send('{"execute": "qmp_capabilities"}')
    expect(other.read(), RETURN_EMPTY, "second client's qmp_capabilities")
    shy = Client(path)
    expect(shy.read(), greeting_bytes(version), "third client's greeting")
    c.send('{ "execute": "stop" }')
    read_reply_and_event(c, RETURN_EMPTY, "STOP")
    check_event(other.read(), "STOP")
    c.send('{ "execute": "cont", "id": {"a": [1, "b"]} }')
    read_reply_and_event(c, b'{"return": {}, "id": {"a": [1, "b"]}}\r\n', "RESUME")
    check_event(other.read(), "RESUME")
    # The third client asks something after both events: its only message is the refusal.
    shy.send('{"execute": "query-status"}')
    expect(shy.read(), REFUSED, "un-negotiated client after two events")
    if shy.pending(0.0):
        fail(f"an un-negotiated client received more: {shy.buf!r}")
    shy.close()
    other.close()

    # Every command the server lists, each with an id of another JSON type, echoed as sent.
    c.send('{"execute": "query-commands", "id": 0}')
    msg = c.read()
    if not msg.endswith(b', "id": 0}\r\n'):
        fail(f"query-commands reply: {msg!r}")
    names = sorted(n["name"] for n in json.loads(msg)["return"])
    expect(names, sorted(["migrate", "query-migrate", "migrate-set-parameters", "query-migrate-parameters",
                          "migrate-cancel", "migrate-pause", "migrate-recover", "stop", "cont", "query-status", "query-version", "check-workload",
                          "query-commands", "qmp_capabilities", "quit"]), "query-commands")
    ids = ['7', '"s"', '-1.5', 'null', 'true', '[1, 2]', '{"k": "v"}']
    for i, name in enumerate(n for n in names if n != "quit"):
        id_text = ids[i % len(ids)]
        c.send('{"execute": "%s", "id": %s}' % (name, id_text))
        msg = c.read()
        while msg.startswith(b'{"event"'):  # stop/cont in the list cause STOP/RESUME
            check_event(msg, "STOP" if name == "stop" else "RESUME")
            msg = c.read()
        if id_text == "null":  # a null id is no id
            if b'"id"' in msg:
                fail(f"{name}: a null id came back: {msg!r}")
        elif not msg.endswith((', "id": %s}\r\n' % id_text).encode()):
            fail(f"{name}: id {id_text} not echoed verbatim: {msg!r}")
        reply = json.loads(msg)
        if ("return" in reply) == ("error" in reply):
            fail(f"{name}: neither return nor error: {msg!r}")
        if "error" in reply and reply["error"]["class"] not in ("GenericError", "CommandNotFound"):
            fail(f"{name}: error class {reply['error']['class']}")
        expect(list(reply.keys())[0], "return" if "return" in reply else "error", f"{name}: first member")
        print(f"python: {name} id={id_text}: {'return' if 'return' in reply else reply['error']['class']}")
    c.send('{"execute": "quit", "id": "bye"}')
    msg = c.read()
    while msg.startswith(b'{"event"'):  # the STOP of the last `stop`, if it comes after its reply
        check_event(msg, "STOP")
        print(f"python: event {msg!r}")
        msg = c.read()
    expect(msg, b'{"return": {}, "id": "bye"}\r\n', "quit")
    c.close()


def main():
    if len(sys.argv) != 3:
        fail("usage: qmp_session.py LAZYMIG_VMM VERSION")
    vmm, version = sys.argv[1], sys.argv[2]
    if shutil.which("socat") is None:
        fail("socat is not installed (scripts/setup.sh installs it)")
    with tempfile.TemporaryDirectory(prefix="lazymig-qmp.") as tmp:
        proc, path = start_vm(vmm, tmp)
        try:
            socat_session(path, version)
            python_session(path, version)
            rc = proc.wait(timeout=TIMEOUT)
            expect(rc, 0, "lazymig-vmm exit code after quit")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                print(open(os.path.join(tmp, "vm.log")).read()[-3000:], file=sys.stderr)
    print("vmm/qmp-session: ok")


if __name__ == "__main__":
    main()
