"""The card's management UART in a bench: the pins, and a bridge to a TCP socket or a pty.

:class:`UartPhy` drives ``uart_rxd`` and samples ``uart_txd`` bit by bit (8N1, ``divisor``
clocks per bit, sampled mid-bit), so the RTL sees a real serial line. :class:`UartBridge`
connects it to the outside world, so that pyserial opens the simulated card exactly like a
board on a USB-UART:

* ``mode="tcp"``: a TCP server on 127.0.0.1 (``bridge.url`` is ``socket://127.0.0.1:PORT``,
  for ``serial.serial_for_url`` or ``python -m serial.tools.miniterm``);
* ``mode="pty"``: a pseudo-terminal (``bridge.url`` is its ``/dev/pts/N`` path).

The socket or pty is served by a thread; bytes cross to the simulation through a queue that a
cocotb coroutine drains every ``poll_cycles`` clocks, so the simulation keeps running while the
firmware on the other side thinks. One client at a time; a new connection replaces the old one.
"""

import os
import queue
import select
import socket
import threading
import tty

import cocotb
from cocotb.triggers import ClockCycles, FallingEdge, Event

__all__ = ["UartPhy", "UartBridge"]


class UartPhy:
    def __init__(self, dut, divisor, *, prefix=""):
        """``prefix`` picks one card of a top level holding several (``cosim.twin``)."""
        self.dut = dut
        self.div = divisor
        self.rxd = getattr(dut, f"{prefix}uart_rxd")
        self.txd = getattr(dut, f"{prefix}uart_txd")
        self.received = bytearray()          # every byte the card sent
        self.byte_event = Event()
        self.on_byte = None                  # callback(byte) for each byte the card sends
        self.bytes_sent = 0
        self._busy = False
        self.rxd.value = 1
        cocotb.start_soon(self._monitor())

    async def send(self, data: bytes):
        """Send ``data`` to the card, back to back."""
        assert not self._busy, "UartPhy.send is not re-entrant"
        self._busy = True
        clk = self.dut.clk
        for byte in data:
            bits = [0] + [(byte >> i) & 1 for i in range(8)] + [1]
            for bit in bits:
                self.rxd.value = bit
                await ClockCycles(clk, self.div)
            self.bytes_sent += 1
        self._busy = False

    async def _monitor(self):
        clk = self.dut.clk
        txd = self.txd
        while True:
            await FallingEdge(txd)
            await ClockCycles(clk, self.div // 2)
            if int(txd.value) != 0:
                continue                                # a glitch, not a start bit
            byte = 0
            for i in range(8):
                await ClockCycles(clk, self.div)
                byte |= int(txd.value) << i
            await ClockCycles(clk, self.div)
            if int(txd.value) != 1:
                self.dut._log.warning("UART: card sent a byte with a bad stop bit")
                continue
            self.received.append(byte)
            if self.on_byte is not None:
                self.on_byte(byte)
            self.byte_event.set()

    async def read(self, n, timeout_cycles=None):
        """The next ``n`` bytes the card sends (from what has not been read yet)."""
        waited = 0
        while len(self.received) < n:
            self.byte_event.clear()
            await ClockCycles(self.dut.clk, self.div * 10)
            waited += self.div * 10
            if timeout_cycles is not None and waited >= timeout_cycles:
                break
        out = bytes(self.received[:n])
        del self.received[:len(out)]
        return out

    async def transact(self, frame: bytes, reply_len, timeout_cycles=None):
        """Send a request frame and collect ``reply_len`` bytes of the answer."""
        self.received.clear()
        await self.send(frame)
        if timeout_cycles is None:
            timeout_cycles = (len(frame) + reply_len + 64) * 10 * self.div + 4096
        return await self.read(reply_len, timeout_cycles)


class UartBridge:
    def __init__(self, phy: UartPhy, mode="tcp", port=0, poll_cycles=64):
        if mode not in ("tcp", "pty"):
            raise ValueError(f"UartBridge mode must be 'tcp' or 'pty', got {mode!r}")
        self.phy = phy
        self.poll_cycles = poll_cycles
        self._to_card = queue.Queue()
        self._stop = threading.Event()
        self._client = None
        self._lock = threading.Lock()
        self.bytes_in = 0
        self.bytes_out = 0
        phy.on_byte = self._from_card
        if mode == "tcp":
            self._srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._srv.bind(("127.0.0.1", port))
            self._srv.listen(1)
            self.port = self._srv.getsockname()[1]
            self.url = f"socket://127.0.0.1:{self.port}"
            target = self._serve_tcp
        else:
            self._master, slave = os.openpty()
            tty.setraw(slave)
            self._slave = slave
            self.url = os.ttyname(slave)
            target = self._serve_pty
        self._thread = threading.Thread(target=target, name="uart-bridge", daemon=True)
        self._thread.start()
        cocotb.start_soon(self._pump())

    @property
    def connected(self):
        """A TCP client is connected (always False for a pty)."""
        return self._client is not None

    # ---- the thread side ----
    def _serve_tcp(self):
        self._srv.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._srv.accept()
            except OSError:
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._client is not None:
                    self._client.close()
                self._client = conn
            conn.settimeout(0.2)
            while not self._stop.is_set():
                try:
                    data = conn.recv(4096)
                except socket.timeout:
                    continue
                except OSError:
                    break
                if not data:
                    break
                self._to_card.put(data)
            with self._lock:
                if self._client is conn:
                    self._client = None
            conn.close()

    def _serve_pty(self):
        while not self._stop.is_set():
            ready, _, _ = select.select([self._master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(self._master, 4096)
                except OSError:
                    break
                if data:
                    self._to_card.put(data)

    def _from_card(self, byte):
        self.bytes_out += 1
        out = bytes([byte])
        with self._lock:
            client = self._client
        try:
            if client is not None:
                client.sendall(out)
            elif hasattr(self, "_master"):
                os.write(self._master, out)
        except OSError:
            pass

    # ---- the simulation side ----
    async def _pump(self):
        clk = self.phy.dut.clk
        while not self._stop.is_set():
            try:
                data = self._to_card.get_nowait()
            except queue.Empty:
                await ClockCycles(clk, self.poll_cycles)
                continue
            self.bytes_in += len(data)
            await self.phy.send(data)

    def close(self):
        self._stop.set()
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
        if hasattr(self, "_srv"):
            self._srv.close()
        else:
            os.close(self._master)
            os.close(self._slave)
