"""A fault-injecting TCP proxy for the storage fault tests: it forwards 127.0.0.1:<port> to
the S3 endpoint and, during a fault window, resets, drops or stalls every connection and
every request on it.

The window opens when a request carrying `trigger` (bytes, e.g. a checkpoint's folder name
in a PUT's request line) passes, or when `open_window()` is called, and lasts `window_s`.
`schedule`, a list of (trigger, mode), opens one window per entry in turn, each in its own
mode. `faulted` counts the connections and requests it broke, `faulted_by_mode` per mode.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import struct
import threading
import time
from typing import Literal

Mode = Literal["reset", "drop", "stall"]


class FaultProxy:
    def __init__(
        self,
        target: tuple[str, int],
        *,
        mode: Mode = "reset",
        window_s: float = 5.0,
        trigger: bytes = b"",
        schedule: list[tuple[bytes, Mode]] | None = None,
    ):
        self.target = target
        self.mode = mode
        self.window_s = window_s
        self._schedule = list(schedule or ([(trigger, mode)] if trigger else []))
        self.window_until = 0.0
        self.windows_opened = 0
        self.faulted = 0
        self.faulted_by_mode: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name="faultproxy-accept", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def open_window(self) -> None:
        with self._lock:
            self.window_until = time.monotonic() + self.window_s
            self.windows_opened += 1

    def in_window(self) -> bool:
        return time.monotonic() < self.window_until

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()

    # --- plumbing -----------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _check(self, chunk: bytes) -> None:
        with self._lock:
            if not self._schedule or self._schedule[0][0] not in chunk or self.in_window():
                return
            _, self.mode = self._schedule.pop(0)
            self.window_until = time.monotonic() + self.window_s
            self.windows_opened += 1

    def _break(self, client: socket.socket, upstream: socket.socket | None) -> None:
        """Break a connection the way the mode says."""
        with self._lock:
            self.faulted += 1
            self.faulted_by_mode[self.mode] += 1
        if self.mode == "stall":
            while self.in_window() and not self._closed.is_set():
                time.sleep(0.05)
        if self.mode == "reset":  # RST instead of FIN
            with contextlib.suppress(OSError):
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        for sock in (client, upstream):
            if sock is not None:
                # Wake the other direction's thread blocked in recv() on this socket first: a
                # close() alone leaves the socket open while it waits, so the peer never hears
                # of it (a client then waited for an answer for good).
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RD)
                with contextlib.suppress(OSError):
                    sock.close()

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            first = client.recv(65536)
            if not first:
                client.close()
                return
            self._check(first)
            if self.in_window():
                self._break(client, None)
                return
            upstream = socket.create_connection(self.target, timeout=30)
            upstream.sendall(first)
            threading.Thread(target=self._pump_back, args=(upstream, client), daemon=True).start()
            if self._pipe(client, upstream, client=client, upstream=upstream, inspect=True):
                return
        except OSError:
            pass
        for sock in (client, upstream):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()

    def _pump_back(self, upstream: socket.socket, client: socket.socket) -> None:
        try:
            if self._pipe(upstream, client, client=client, upstream=upstream, inspect=False):
                return
        except OSError:
            pass
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_WR)

    def _pipe(
        self,
        source: socket.socket,
        sink: socket.socket,
        *,
        client: socket.socket,
        upstream: socket.socket,
        inspect: bool,
    ) -> bool:
        """Forward `source` to `sink` until it ends (False) or a fault window breaks the
        connection (True). `inspect`: requests (client to store) may open the window."""
        while chunk := source.recv(65536):
            if inspect:
                self._check(chunk)
            if self.in_window():
                self._break(client, upstream)
                return True
            sink.sendall(chunk)
        return False
