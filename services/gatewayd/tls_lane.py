"""The TLS lane's two halves on `ssl.SSLObject`: `TlsSetup` runs the handshake and the framed auth
exchange on the event loop; `TlsPump` then copies an established tunnel's bytes on two blocking
threads. (asyncio's SSL transport cannot half-close, and close_notify is a half-close in TLS 1.3.)"""
from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from typing import TYPE_CHECKING, Any, Callable

from common.frames import FrameDecoder, FrameEOF, encode_frame
from common.identity import AuthError, node_id_of_cert

if TYPE_CHECKING:
    from services.gatewayd.splice import Splice

HANDSHAKE_FRAME_MAX = 64 << 10
READ_BYTES = 256 << 10        # one recv during tunnel setup
TLS_RECORD_BYTES = 16 << 10   # the most plaintext one TLS record carries
PUMP_BYTES = 256 << 10        # one recv of the TLS lane's pump, passed on whole while the next hop
                              # works on the one before (64 KiB: more wake-ups, slower)


class TlsSetup:
    """TLS handshake and the framed auth exchange, as coroutines over a non-blocking socket."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, *, server_side: bool):
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.ssl = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side)
        self.decoder = FrameDecoder(HANDSHAKE_FRAME_MAX)
        self._peer_eof = False

    async def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            await self.loop.sock_sendall(self.sock, data)

    async def _receive(self) -> None:
        data = await self.loop.sock_recv(self.sock, READ_BYTES)
        if not data:
            raise ConnectionResetError("peer closed the connection during tunnel setup")
        self.incoming.write(data)

    async def handshake(self) -> None:
        while True:
            try:
                self.ssl.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                await self._receive()
        await self._flush()

    def peer_node_id(self) -> str:
        der = self.ssl.getpeercert(binary_form=True)
        if not der:
            raise AuthError("TLS peer presented no certificate")
        return node_id_of_cert(der)

    async def send(self, *frames: dict) -> None:
        self.ssl.write(b"".join(encode_frame(frame) for frame in frames))
        await self._flush()

    async def read_frame(self) -> dict:
        while True:
            frame = self.decoder.next_frame()
            if frame is not None:
                return frame
            if self._peer_eof:
                raise FrameEOF("peer ended the TLS stream during tunnel setup")
            try:
                chunk = self.ssl.read(TLS_RECORD_BYTES)
            except ssl.SSLWantReadError:
                await self._flush()  # TLS may owe the peer something (e.g. a key update)
                await self._receive()
                continue
            except ssl.SSLZeroReturnError:
                chunk = b""
            if not chunk:
                self._peer_eof = True
                continue
            self.decoder.feed(chunk)

    def close(self) -> None:
        self.sock.close()



class TlsPump:
    """Copies an established TLS tunnel's bytes on two blocking threads, one per direction.

    The threads drop the GIL in recv/send and in OpenSSL's read/write, so a message costs a
    thread wake-up per hop instead of an event-loop pass, and one hop's encryption overlaps the
    next hop's decryption (decode tok/s of llama.cpp RPC: see bench/bench_rpc.py).
    Half-close: local EOF becomes close_notify plus TCP SHUT_WR; the peer's close_notify becomes
    SHUT_WR of the local socket. Any error, a FIN without close_notify included, aborts both
    sockets. Backpressure is the blocking send: at most one buffer per direction is held here.
    """

    def __init__(self, splice: "Splice", setup: TlsSetup, local: socket.socket):
        self.splice = splice
        self.stats = splice.stats
        self.loop = setup.loop
        self.local, self.remote = local, setup.sock
        self.ssl, self.incoming, self.outgoing = setup.ssl, setup.incoming, setup.outgoing
        self.setup_rest = setup.decoder.take_rest()
        self.setup_eof = setup._peer_eof
        self.ssl_lock = threading.Lock()    # the SSLObject and its BIOs are shared by both threads
        self.send_lock = threading.Lock()   # records go on the wire in the order they were made
        self.state_lock = threading.Lock()  # `running` and the sockets, against abort() from the loop
        self.running = 0
        self.aborted = False

    def start(self) -> None:
        # Records decrypted or left undecrypted during setup: drain them here, so that the BIO
        # never holds a whole record while ssl_lock is free (see _send).
        plain, eof = [self.setup_rest] if self.setup_rest else [], self.setup_eof
        while not eof:
            try:
                data = self.ssl.read(TLS_RECORD_BYTES)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                data = b""
            if not data:
                eof = True
            plain.append(data)
        for sock in (self.local, self.remote):
            sock.setblocking(True)
        self.running = 2
        threading.Thread(target=self._run, args=(self._upstream,), name="tunnel-up", daemon=True).start()
        threading.Thread(target=self._run, args=(self._downstream, b"".join(plain), eof),
                         name="tunnel-down", daemon=True).start()

    def abort(self, exc: BaseException | None = None) -> None:
        """Stop both directions: shutting the sockets down wakes the threads blocked on them."""
        with self.state_lock:
            if self.aborted or not self.running:
                return
            self.aborted = True
            if exc is not None:
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
            for sock in (self.local, self.remote):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _run(self, direction: Callable[..., None], *args: Any) -> None:
        try:
            direction(*args)
        except Exception as exc:  # OSError, ssl.SSLError, ...: the tunnel is broken either way
            self.abort(exc)
        with self.state_lock:
            self.running -= 1
            last = not self.running
            if last:
                self.local.close()
                self.remote.close()
        if last:
            try:
                self.loop.call_soon_threadsafe(self.splice.pump_finished)
            except RuntimeError:
                pass  # the event loop is closed: so is the service

    def _upstream(self) -> None:
        """Local socket -> peer; the local EOF becomes close_notify and a TCP half-close."""
        buffer = bytearray(PUMP_BYTES)
        view = memoryview(buffer)
        recv_into, stats = self.local.recv_into, self.stats
        while count := recv_into(buffer):
            with stats.lock:
                stats.bytes_out += count
            self._send(view[:count])
        self._send(None)
        self.remote.shutdown(socket.SHUT_WR)

    def _send(self, plain: bytes | memoryview | None) -> None:
        """Encrypt and send `plain`; None: close_notify; empty: what TLS itself owes the peer."""
        with self.send_lock:
            with self.ssl_lock:
                if plain is None:
                    # A second SSL_shutdown inside unwrap() reads, and would drop application
                    # records waiting in the BIO; _downstream leaves none there between turns.
                    try:
                        self.ssl.unwrap()
                    except ssl.SSLWantReadError:
                        pass  # close_notify is queued; the peer's data keeps coming
                elif plain:
                    self.ssl.write(plain)
                records = self.outgoing.read()
            if records:
                self.remote.sendall(records)

    def _downstream(self, setup_plain: bytes, eof: bool) -> None:
        """Peer -> local socket; the peer's close_notify becomes a TCP half-close."""
        if setup_plain:
            self._deliver(setup_plain)
        buffer = bytearray(PUMP_BYTES)
        view = memoryview(buffer)
        # The plaintext of one recv plus that of the partial record left from the one before.
        plain = memoryview(bytearray(PUMP_BYTES + 2 * TLS_RECORD_BYTES))
        recv_into, write, read = self.remote.recv_into, self.incoming.write, self.ssl.read
        while not eof:
            count = recv_into(buffer)
            if not count:
                raise ConnectionResetError("TLS peer closed TCP without close_notify")
            filled = 0
            with self.ssl_lock:
                write(view[:count])
                while True:  # every whole record in the BIO, before the lock is let go
                    try:
                        got = read(TLS_RECORD_BYTES, plain[filled:filled + TLS_RECORD_BYTES])
                    except ssl.SSLWantReadError:
                        break
                    except ssl.SSLZeroReturnError:
                        got = 0
                    if not got:
                        eof = True
                        break
                    filled += got
                owed = self.outgoing.pending
            if owed:
                self._send(b"")  # post-handshake TLS messages
            if filled:
                self._deliver(plain[:filled])
        self.local.shutdown(socket.SHUT_WR)

    def _deliver(self, data: bytes | memoryview) -> None:
        with self.stats.lock:
            self.stats.bytes_in += len(data)
        self.local.sendall(data)
