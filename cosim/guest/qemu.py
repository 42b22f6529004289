"""QEMU for the guest: the argument list, and :class:`Guest`, a console driver with a sans-IO core.

The console protocol is the one ``init.sh`` documents: the guest prints ``OFFCARD-READY <if>
<mac> <ip>`` once its command loop listens; a command goes in as ``OFFCARD-CMD <token> <base64>
<timeout>`` and comes back as ``OFFCARD-BEGIN <token>``, the output, ``OFFCARD-DONE <token>
<rc> <nl>``. :class:`ConsoleParser` parses that from bytes (no I/O at all); :class:`Guest` runs
QEMU with the console on its stdin/stdout pipes and never blocks in its event-loop methods::

    guest = Guest.start(image, netdev_args=vhost_user_net(sock), ip="10.0.0.1/24")
    loop.add_reader(guest.fileno(), guest.on_readable)   # or call on_readable() when polling
    token = guest.send("ping -c 3 10.0.0.2")
    ...
    result = guest.poll(token)                            # None until done, then (rc, output)

The blocking conveniences (:meth:`Guest.wait_ready`, :meth:`Guest.run`, :meth:`Guest.poweroff`,
:meth:`Guest.wait_exit`) loop on ``select`` for plain pytest use. Every wait has a timeout and
fails with :class:`GuestError`: one line saying what happened, then the last console lines.

The guest RAM is always a shared memfd (``memory-backend-memfd,share=on``) so that a vhost-user
back-end can map it. Under TCG the virtio-net device needs ``vectors=0`` (QEMU 7.2 crashes when
vhost-user starts on a device with MSI-X vectors); the user-net variant uses the same device.
"""

from __future__ import annotations

import base64
import codecs
import fcntl
import json
import math
import os
import secrets
import select
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .image import GuestImage

__all__ = [
    "DEFAULT_MAC",
    "DEFAULT_MEM_MB",
    "NETDEV_ID",
    "QEMU",
    "ConsoleParser",
    "Guest",
    "GuestError",
    "Ready",
    "kernel_cmdline",
    "qemu_args",
    "user_net",
    "vhost_user_net",
]

QEMU = "qemu-system-x86_64"
#: Guest RAM: 128 MiB boots with room to spare (64 MiB does not: QEMU exits at once).
DEFAULT_MEM_MB = 128
DEFAULT_MAC = "52:54:00:0f:ca:01"
#: The id of the guest's netdev (the ``-netdev`` helpers and the ``-device`` use it).
NETDEV_ID = "n0"
#: Longest console line the guest's tty takes in canonical mode (4095 characters and newline).
MAX_LINE = 4000
#: Seconds a command's result may arrive after its guest-side timeout killed it.
KILL_GRACE_S = 15.0
#: Console lines quoted in a :class:`GuestError`.
TAIL_LINES = 15


class GuestError(RuntimeError):
    """The guest died, timed out or misbehaved. ``str()`` is a one-line summary followed by the
    last console lines (and QEMU's stderr if it said anything)."""


# --- arguments ------------------------------------------------------------------------------


def user_net(*, hostfwd: Sequence[str] = ()) -> list[str]:
    """QEMU's user (slirp) network: the guest is 10.0.2.15/24, the gateway 10.0.2.2.
    ``hostfwd`` entries look like ``tcp::5555-:22``."""
    opts = "".join(f",hostfwd={rule}" for rule in hostfwd)
    return ["-netdev", f"user,id={NETDEV_ID}{opts}"]


def vhost_user_net(socket_path: str | os.PathLike, *, queues: int = 1) -> list[str]:
    """A vhost-user netdev whose back-end listens on ``socket_path`` (QEMU connects to it at
    start-up and fails if nobody listens)."""
    return ["-chardev", f"socket,id={NETDEV_ID}c,path={os.fspath(socket_path)}",
            "-netdev", f"vhost-user,id={NETDEV_ID},chardev={NETDEV_ID}c,queues={queues}"]


def kernel_cmdline(*, ip: str | None = None, gw: str | None = None, peer: str | None = None,
                   shell: bool = False, printk: int | None = None, ipv6: bool = False,
                   append: Sequence[str] = ()) -> str:
    """The kernel command line: ``console=ttyS0``, ``panic=-1`` (with ``-no-reboot`` a panic
    ends QEMU) and the ``offcard.*`` options of ``init.sh``."""
    parts = ["console=ttyS0", "panic=-1"]
    for key, value in (("ip", ip), ("gw", gw), ("peer", peer), ("printk", printk)):
        if value is not None:
            if " " in str(value):
                raise ValueError(f"offcard.{key} must have no spaces: {value!r}")
            parts.append(f"offcard.{key}={value}")
    if ipv6:
        parts.append("offcard.ipv6=1")
    if shell:
        parts.append("offcard.shell=1")
    return " ".join([*parts, *append])


def qemu_args(image: GuestImage, *, mem_mb: int = DEFAULT_MEM_MB, memfd: bool = True,
              netdev_args: Sequence[str] | None = None, mac: str = DEFAULT_MAC,
              ip: str | None = None, gw: str | None = None, peer: str | None = None,
              qmp_path: str | os.PathLike | None = None, console: str = "stdio",
              shell: bool = False, printk: int | None = None, ipv6: bool = False,
              append: Sequence[str] = (), extra_args: Sequence[str] = (),
              nic_opts: Sequence[str] = (), qemu: str = QEMU) -> list[str]:
    """The QEMU command line for ``image`` (q35, TCG, no default devices, no reboot).

    ``netdev_args`` comes from :func:`user_net` or :func:`vhost_user_net` (``None``: no NIC);
    the NIC is ``virtio-net-pci,disable-legacy=on,vectors=0`` with ``mac`` and no option ROM.
    ``console="stdio"`` puts ttyS0 on QEMU's stdin/stdout (for :class:`Guest`), ``"terminal"``
    the same multiplexed with the monitor (``Ctrl-A x`` quits; for a human). ``memfd=False``
    gives plain RAM (no vhost-user then). ``qmp_path``: a QMP server socket. ``nic_opts`` are
    more properties of the NIC (``"mrg_rxbuf=off"``...).
    """
    if console not in ("stdio", "terminal"):
        raise ValueError(f"console must be 'stdio' or 'terminal', not {console!r}")
    netdev = list(netdev_args or ())
    if not memfd and any(arg.startswith("vhost-user") for arg in netdev):
        raise ValueError("vhost-user needs the guest RAM in a shared memfd (memfd=True)")
    args = [qemu, "-nodefaults", "-no-user-config", "-machine", "q35", "-accel", "tcg",
            "-m", f"{mem_mb}M"]
    if memfd:
        args += ["-object", f"memory-backend-memfd,id=mem,size={mem_mb}M,share=on",
                 "-machine", "memory-backend=mem"]
    args += ["-kernel", str(image.kernel), "-initrd", str(image.initramfs),
             "-append", kernel_cmdline(ip=ip, gw=gw, peer=peer, shell=shell, printk=printk,
                                       ipv6=ipv6, append=append),
             "-display", "none", "-no-reboot",
             "-serial", "stdio" if console == "stdio" else "mon:stdio"]
    if console == "stdio":
        args += ["-monitor", "none"]
    if netdev:
        args += [*netdev, "-device", ",".join([f"virtio-net-pci,netdev={NETDEV_ID}",
                                               "disable-legacy=on", "vectors=0", f"mac={mac}",
                                               "romfile=", *nic_opts])]
    if qmp_path is not None:
        args += ["-qmp", f"unix:{os.fspath(qmp_path)},server=on,wait=off"]
    return [*args, *extra_args]


# --- the console protocol (sans-IO) ---------------------------------------------------------


def guest_timeout(timeout: float) -> int:
    """The whole seconds the guest gives a command with a ``timeout`` (rounded up, at least 1)."""
    return max(1, math.ceil(timeout))


@dataclass(frozen=True)
class Ready:
    """The guest's READY line: interface, MAC and address (``None`` where the guest said
    ``-``), and the seconds since start when it was seen."""

    ifname: str | None
    mac: str | None
    ip: str | None
    at: float = 0.0


class ConsoleParser:
    """Parses the guest console from bytes; knows nothing of QEMU or file descriptors.

    :meth:`feed` takes any chunk of console output. It collects ``log`` (all text, ``\\r``
    removed at line ends), ``ready``, ``errors`` (the OFFCARD-ERROR texts) and, per token, the
    result ``(rc, output)``. Only complete lines count, and a result only between the exact
    ``OFFCARD-BEGIN <token>`` and ``OFFCARD-DONE <token> ...`` lines, so kernel noise or an
    echoed command line (``OFFCARD-CMD ...``) never reads as output.
    """

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._t0 = clock()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = ""
        self._chunks: list[str] = []
        self._current: str | None = None
        self._lines: list[str] = []
        self.ready: Ready | None = None
        self.errors: list[str] = []
        self.results: dict[str, tuple[int, str]] = {}

    @property
    def log(self) -> str:
        """All console text so far (line ends as ``\\n``)."""
        return "".join(self._chunks) + self._partial

    def tail(self, n: int = TAIL_LINES) -> list[str]:
        return self.log.splitlines()[-n:]

    def feed(self, data: bytes) -> None:
        text = self._partial + self._decoder.decode(data)
        *lines, self._partial = text.split("\n")
        for line in lines:
            line = line.rstrip("\r")
            self._chunks.append(line + "\n")
            self._line(line)

    def _line(self, line: str) -> None:
        if self._current is not None:
            done = line.split(" ")
            if len(done) == 4 and done[0] == "OFFCARD-DONE" and done[1] == self._current:
                output = "".join(f"{out}\n" for out in self._lines)
                if done[3] == "0":
                    output = output[:-1]
                self.results[self._current] = (int(done[2]), output)
                self._current = None
            else:
                self._lines.append(line)
        elif line.startswith("OFFCARD-BEGIN "):
            self._current, self._lines = line.split(" ", 1)[1].strip(), []
        elif line.startswith("OFFCARD-READY ") and self.ready is None:
            fields = (line.split() + ["-"] * 3)[1:4]
            ifname, mac, ip = (None if field == "-" else field for field in fields)
            self.ready = Ready(ifname, mac, ip, self._clock() - self._t0)
        elif line.startswith("OFFCARD-ERROR "):
            self.errors.append(line.split(" ", 1)[1])

    @staticmethod
    def command_line(token: str, cmd: str, timeout: float | None = None) -> bytes:
        """The console line that runs ``cmd`` (any text, newlines too) as ``token``; the guest
        kills it after ``timeout`` seconds (rounded up; ``None``: never)."""
        if not token or any(c.isspace() for c in token):
            raise ValueError(f"bad token {token!r}")
        secs = 0 if timeout is None else guest_timeout(timeout)
        encoded = base64.b64encode(cmd.encode()).decode()
        line = f"OFFCARD-CMD {token} {encoded} {secs}\n".encode()
        if len(line) > MAX_LINE:
            raise ValueError(f"command too long for the console ({len(cmd)} bytes)")
        return line


# --- the QEMU process -----------------------------------------------------------------------


def _reap(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


class Guest:
    """A running QEMU guest, driven through its serial console.

    Event-loop interface (none of it blocks): :meth:`fileno` is the console fd to watch for
    reading, :meth:`on_readable` consumes what is there, :meth:`send` queues a command and
    returns its token, :meth:`poll` gives ``None`` or ``(rc, output)``, :attr:`ready` the READY
    line (``None`` before), :attr:`log` the console text, :attr:`returncode` QEMU's exit status
    (``None`` while it runs). Commands are written one at a time, each once the previous one is
    done and the guest is ready; :meth:`wants_write` / :meth:`on_writable` flush a pending
    write if a pipe was ever full (:meth:`on_readable` flushes too).

    :meth:`kill` ends QEMU; the context manager kills on exit. QEMU's stderr goes to
    ``<workdir>/qemu.stderr``; the workdir (a temporary folder, also holding the QMP socket)
    is removed by :meth:`kill` unless ``keep_workdir``.
    """

    def __init__(self, argv: Sequence[str], *, workdir: Path | None = None,
                 qmp_path: Path | None = None, boot_timeout: float = 60.0,
                 keep_workdir: bool = False):
        if shutil.which(argv[0]) is None:
            raise GuestError(f"{argv[0]} not found: apt-get install qemu-system-x86")
        self.argv = list(argv)
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="offcard_qemu_"))
        self.qmp_path = qmp_path
        self.boot_timeout = boot_timeout
        self._keep_workdir = keep_workdir
        self._parser = ConsoleParser()
        self._nonce = secrets.token_hex(3)
        self._count = 0
        self._queue: deque[tuple[str, bytes]] = deque()
        self._inflight: str | None = None
        self._outbuf = bytearray()
        self._sent_at: dict[str, float] = {}
        self._qmp: socket.socket | None = None
        self._qmp_buf = b""
        self.console_closed = False
        self._stderr_path = self.workdir / "qemu.stderr"
        try:
            with open(self._stderr_path, "wb") as stderr:
                self._proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE, stderr=stderr,
                                              start_new_session=True)
        except OSError as exc:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise GuestError(f"starting {self.argv[0]} failed: {exc}") from None
        # a Guest dropped without kill() must not leave QEMU running (its own session: no ^C)
        weakref.finalize(self, _reap, self._proc)
        for pipe in (self._proc.stdin, self._proc.stdout):
            flags = fcntl.fcntl(pipe.fileno(), fcntl.F_GETFL)
            fcntl.fcntl(pipe.fileno(), fcntl.F_SETFL, flags | os.O_NONBLOCK)
        self.started_at = time.monotonic()

    @classmethod
    def start(cls, image: GuestImage, *, qmp: bool = False, boot_timeout: float = 60.0,
              keep_workdir: bool = False, **qemu_kwargs) -> "Guest":
        """Start QEMU on ``image``; ``qemu_kwargs`` go to :func:`qemu_args` (``console`` is
        always ``"stdio"``). ``qmp=True`` adds a QMP socket (:attr:`qmp_path`, :meth:`qmp`)."""
        qemu = qemu_kwargs.get("qemu", QEMU)
        if shutil.which(qemu) is None:
            raise GuestError(f"{qemu} not found: apt-get install qemu-system-x86")
        workdir = Path(tempfile.mkdtemp(prefix="offcard_qemu_"))
        qmp_path = workdir / "qmp.sock" if qmp else None
        argv = qemu_args(image, qmp_path=qmp_path, console="stdio", **qemu_kwargs)
        return cls(argv, workdir=workdir, qmp_path=qmp_path, boot_timeout=boot_timeout,
                   keep_workdir=keep_workdir)

    # --- sans-IO core ---------------------------------------------------------------------

    def fileno(self) -> int:
        """The console fd (QEMU's stdout) to watch for readability."""
        return self._proc.stdout.fileno()

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def ready(self) -> Ready | None:
        return self._parser.ready

    @property
    def errors(self) -> list[str]:
        """The OFFCARD-ERROR lines of the init (set-up failures)."""
        return list(self._parser.errors)

    @property
    def log(self) -> str:
        return self._parser.log

    @property
    def returncode(self) -> int | None:
        return self._proc.poll()

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None and not self.console_closed

    def on_readable(self) -> int:
        """Read whatever the console has (never blocks) and return the byte count; at end of
        file :attr:`console_closed` becomes true (QEMU is exiting)."""
        total = 0
        while not self.console_closed:
            try:
                data = os.read(self.fileno(), 1 << 16)
            except BlockingIOError:
                break
            if not data:
                self.console_closed = True
                break
            total += len(data)
            self._parser.feed(data)
        if self._inflight is not None and self._inflight in self._parser.results:
            self._inflight = None
        self._pump()
        return total

    def adopt(self, ready: Ready) -> None:
        """This QEMU runs a guest that booted in another one and was migrated in
        (``-incoming``): take that guest's READY line, so that commands go to its console."""
        if self._parser.ready is None:
            self._parser.ready = ready
        self._pump()

    def send(self, cmd: str, timeout: float | None = None) -> str:
        """Queue ``cmd`` (run by ``sh -c`` in the guest, killed there after ``timeout``
        seconds if given) and return its token for :meth:`poll`. Never blocks."""
        self._count += 1
        token = f"{self._nonce}.{self._count}"
        self._queue.append((token, ConsoleParser.command_line(token, cmd, timeout)))
        self._pump()
        return token

    def poll(self, token: str) -> tuple[int, str] | None:
        """``(exit status, output)`` of the command ``token`` once done, else ``None``."""
        return self._parser.results.get(token)

    def wants_write(self) -> bool:
        return bool(self._outbuf)

    def on_writable(self) -> None:
        self._pump()

    def _pump(self) -> None:
        if self._inflight is None and self._queue and self.ready is not None:
            token, line = self._queue.popleft()
            self._inflight = token
            self._sent_at[token] = time.monotonic()
            self._outbuf += line
        if self._outbuf and self._proc.stdin is not None and not self._proc.stdin.closed:
            try:
                written = os.write(self._proc.stdin.fileno(), self._outbuf)
            except BlockingIOError:
                return
            except (BrokenPipeError, OSError):
                self._outbuf.clear()
                return
            del self._outbuf[:written]

    def kill(self) -> None:
        """End QEMU (SIGKILL if still running), reap it, close the pipes, drop the workdir."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        for pipe in (self._proc.stdin, self._proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        self.console_closed = True
        if not self._keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Guest":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()

    # --- blocking conveniences ------------------------------------------------------------

    def _wait(self, done, timeout: float, what: str):
        """Read the console until ``done()`` returns something true, and return it."""
        deadline = time.monotonic() + timeout
        while True:
            result = done()
            if result:
                return result
            if self.console_closed or self._proc.poll() is not None:
                self.on_readable()
                if (result := done()):
                    return result
                try:
                    rc = self._proc.wait(timeout=2.0)
                except subprocess.TimeoutExpired:
                    rc = None
                quiet = "" if self.log.strip() else ", no console output at all"
                raise self.error(f"{what}: QEMU exited (status {rc}{quiet})")
            left = deadline - time.monotonic()
            if left <= 0:
                raise self.error(f"{what}: timed out after {timeout:g} s")
            writes = [self._proc.stdin] if self._outbuf else []
            select.select([self.fileno()], writes, [], min(left, 0.5))
            self.on_readable()

    def wait_ready(self, timeout: float | None = None, *, allow_errors: bool = False) -> Ready:
        """Wait for the READY line (``timeout`` defaults to :attr:`boot_timeout`); an
        OFFCARD-ERROR line fails at once unless ``allow_errors``."""
        def ready():
            if self._parser.errors and not allow_errors:
                raise self.error(f"guest set-up failed: {self._parser.errors[0]}")
            return self.ready
        return self._wait(ready, self.boot_timeout if timeout is None else timeout,
                          "waiting for the guest's READY line")

    def run(self, cmd: str, timeout: float = 30.0) -> tuple[int, str]:
        """Run ``cmd`` in the guest and return ``(exit status, output)``. The guest kills it
        after ``timeout`` s, which fails here; waits for READY first if needed."""
        if self.ready is None:
            self.wait_ready()
        token = self.send(cmd, timeout)
        what = f"running {cmd!r} in the guest"
        rc, output = self._wait(lambda: self.poll(token), timeout + KILL_GRACE_S, what)
        took = time.monotonic() - self._sent_at[token]
        if rc == 137 and took >= timeout:
            raise self.error(f"{what}: killed after its {guest_timeout(timeout)} s timeout; "
                             f"output: {output[-200:]!r}")
        return rc, output

    def check(self, cmd: str, timeout: float = 30.0) -> str:
        """Like :meth:`run`, and fails unless the exit status is 0; returns the output."""
        rc, output = self.run(cmd, timeout)
        if rc != 0:
            raise self.error(f"{cmd!r} exited with status {rc} in the guest: {output[-300:]!r}")
        return output

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait for QEMU to exit (reading the console meanwhile); return its status."""
        def exited():
            rc = self._proc.poll()
            return (rc,) if rc is not None else None
        deadline = time.monotonic() + timeout
        while (rc := exited()) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self.error(f"waiting for QEMU to exit: timed out after {timeout:g} s")
            if self.console_closed:
                time.sleep(min(left, 0.05))
            else:
                select.select([self.fileno()], [], [], min(left, 0.5))
                self.on_readable()
        self.on_readable()
        return rc[0]

    def poweroff(self, timeout: float = 30.0) -> None:
        """``poweroff -f`` in the guest; fails unless the kernel said ``reboot: Power down``
        and QEMU then exited with status 0 (with ``-no-reboot`` a reset or a panic also ends
        QEMU with status 0)."""
        if self.ready is None:
            self.wait_ready()
        self.send("poweroff -f")
        rc = self.wait_exit(timeout)
        if rc != 0 or "reboot: Power down" not in self.log:
            raise self.error(f"QEMU exited with status {rc} after poweroff, the kernel did "
                             "not say 'reboot: Power down'")

    # --- QMP ------------------------------------------------------------------------------

    def qmp(self, command: str, timeout: float = 10.0, **arguments) -> object:
        """Run a QMP command (blocking; needs ``Guest.start(..., qmp=True)``) and return its
        ``return`` value; events are skipped. Raises :class:`GuestError` on an error reply."""
        if self.qmp_path is None:
            raise GuestError("this guest has no QMP socket (start it with qmp=True)")
        deadline = time.monotonic() + timeout
        if self._qmp is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            while True:
                try:
                    sock.connect(os.fspath(self.qmp_path))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() > deadline or self._proc.poll() is not None:
                        sock.close()
                        raise self.error(f"QMP: cannot connect to {self.qmp_path}") from None
                    time.sleep(0.05)
            self._qmp = sock
            self._qmp_message(deadline)  # the greeting
            self._qmp_command("qmp_capabilities", {}, deadline)
        return self._qmp_command(command, arguments, deadline)

    def _qmp_command(self, command: str, arguments: dict, deadline: float) -> object:
        message = {"execute": command, **({"arguments": arguments} if arguments else {})}
        self._qmp.sendall(json.dumps(message).encode() + b"\n")
        while True:
            reply = self._qmp_message(deadline)
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise GuestError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")

    def _qmp_message(self, deadline: float) -> dict:
        while b"\n" not in self._qmp_buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self.error("QMP: no reply in time")
            self._qmp.settimeout(left)
            try:
                data = self._qmp.recv(1 << 16)
            except socket.timeout:
                continue
            if not data:
                raise self.error("QMP: QEMU closed the socket")
            self._qmp_buf += data
        line, self._qmp_buf = self._qmp_buf.split(b"\n", 1)
        return json.loads(line)

    # --- failure messages -----------------------------------------------------------------

    def stderr_text(self) -> str:
        try:
            return self._stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def error(self, summary: str) -> GuestError:
        """A :class:`GuestError`: ``summary`` (one line, with the time since start), then the
        last console lines and QEMU's stderr."""
        elapsed = time.monotonic() - self.started_at
        panic = [line for line in self._parser.tail(10_000) if "Kernel panic" in line]
        if panic:
            summary += f" ({panic[0].strip()})"
        lines = [f"{summary} [{elapsed:.1f} s after start]", "--- last console lines ---",
                 *self._parser.tail()]
        stderr = self.stderr_text().strip()
        if stderr:
            lines += ["--- QEMU stderr ---", *stderr.splitlines()[-5:]]
        return GuestError("\n".join(lines))
