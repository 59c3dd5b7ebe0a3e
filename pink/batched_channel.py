"""An SSH channel that sends a large write as many packets in one socket write.

OpenSSH's sshd accepts at most 32 KiB of data per packet on a session
channel, so a 1 GiB image is about 33,000 SSH packets. paramiko's
`Channel.send` sends one packet per call, and each costs a message object, a
few copies, two lock round trips and a `socket.send`: on the bench's two
cores the client spent 6.3 CPU-seconds per GiB where OpenSSH's `scp` spends
2.7, and the image copy reached 0.75x scp. `BatchedChannel.send` takes as
much of a write as the peer's window allows, frames and encrypts it as
full-size packets under paramiko's own locks and counters, and hands the
socket one buffer (4.1 CPU-seconds per GiB, measured beside `make bench`'s
transfer figure).

Only AES-GCM (`aes128-gcm@openssh.com`, what PINK asks for) without
compression takes this path; with any other cipher, or a paramiko whose
internals differ (setup.cfg keeps it below 6), `send` is paramiko's. Key re-exchange works as with
paramiko: a batch waits while one is under way, and the packet counters
that trigger one advance as paramiko's would.
"""

from __future__ import annotations

import os
import socket
import struct
import time

import paramiko
from paramiko.common import cMSG_CHANNEL_DATA

_GCM_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")  # RFC 5647 framing: length in clear
_GCM_BLOCK = 16  # AES block size: the padded packet is a multiple of it
_PACKET_RESERVE = 64  # bytes paramiko keeps free in each packet for its headers (Channel._wait_for_send_window)
_STATE = ("_Packetizer__write_lock", "_Packetizer__block_engine_out", "_Packetizer__iv_out",
          "_Packetizer__sequence_number_out", "_Packetizer__aead_out", "_Packetizer__etm_out",
          "_Packetizer__compress_engine_out", "_Packetizer__sent_bytes", "_Packetizer__sent_packets",
          "_Packetizer__need_rekey")


class BatchedChannel:
    """Wraps a paramiko Channel: `send` batches; everything else is the channel's."""

    def __init__(self, channel: paramiko.Channel):
        self._chan = channel
        self._transport = channel.get_transport()
        self._packetizer = self._transport.packetizer

    def __getattr__(self, name):
        return getattr(self._chan, name)

    def send(self, data) -> int:
        """Send all of `data` (waiting for window as it goes); returns the bytes sent."""
        if not self._batchable():
            return self._chan.send(data)
        view = memoryview(data)
        sent = 0
        while sent < len(view):
            allowed = self._reserve_window(len(view) - sent)
            if allowed == 0:
                break  # closed: paramiko's send returns 0 too
            self._send_packets(view[sent:sent + allowed])
            sent += allowed
        return sent

    def _batchable(self) -> bool:
        p = self._packetizer
        if self._transport.local_cipher not in _GCM_CIPHERS or not all(hasattr(p, name) for name in _STATE):
            return False
        return (p._Packetizer__aead_out and not p._Packetizer__etm_out
                and p._Packetizer__compress_engine_out is None
                and p._Packetizer__block_engine_out is not None)

    def _reserve_window(self, wanted: int) -> int:
        """Take up to `wanted` bytes of the peer's window, waiting as paramiko does."""
        chan = self._chan
        with chan.lock:
            timeout = chan.timeout
            while chan.out_window_size == 0:
                if chan.closed or chan.eof_sent:
                    return 0
                then = time.monotonic()
                chan.out_buffer_cv.wait(timeout)
                if timeout is not None:
                    timeout -= time.monotonic() - then
                    if timeout <= 0:
                        raise socket.timeout()
            if chan.closed or chan.eof_sent:
                return 0
            allowed = min(wanted, chan.out_window_size)
            chan.out_window_size -= allowed
            return allowed

    def _send_packets(self, view: memoryview) -> None:
        """Frame `view` as channel-data packets and send them, as Transport._send_user_message would."""
        transport = self._transport
        start = time.monotonic()
        while True:  # wait out a key exchange, as paramiko does for every user message
            transport.clear_to_send.wait(0.1)
            if not transport.active:
                raise EOFError("the SSH connection closed")
            transport.clear_to_send_lock.acquire()
            if transport.clear_to_send.is_set():
                break
            transport.clear_to_send_lock.release()
            if time.monotonic() > start + transport.clear_to_send_timeout:
                raise paramiko.SSHException("Key-exchange timed out waiting for key negotiation")
        try:
            self._write_encrypted(view)
        finally:
            transport.clear_to_send_lock.release()

    def _write_encrypted(self, view: memoryview) -> None:
        """Encrypt each packet under the packetizer's lock and counters (RFC 5647), then one write."""
        p = self._packetizer
        per_packet = self._chan.out_max_packet_size - _PACKET_RESERVE
        head = cMSG_CHANNEL_DATA + struct.pack(">I", self._chan.remote_chanid)
        with p._Packetizer__write_lock:
            engine = p._Packetizer__block_engine_out
            iv = p._Packetizer__iv_out
            fixed, counter = iv[:4], int.from_bytes(iv[4:], "big")
            randoms = os.urandom(2 * _GCM_BLOCK * (len(view) // per_packet + 1))  # padding: one call, not one per packet
            out = []
            for index, offset in enumerate(range(0, len(view), per_packet)):
                chunk = view[offset:offset + per_packet]
                payload = len(head) + 4 + len(chunk)
                padding = 3 + _GCM_BLOCK - ((payload + 4) % _GCM_BLOCK)
                length = struct.pack(">I", payload + padding + 1)
                pad_at = index * 2 * _GCM_BLOCK
                body = b"".join((bytes((padding,)), head, struct.pack(">I", len(chunk)), chunk,
                                 randoms[pad_at:pad_at + padding]))
                out.append(length)
                out.append(engine.encrypt(fixed + counter.to_bytes(8, "big"), body, length))
                counter = (counter + 1) & 0xFFFFFFFFFFFFFFFF
            packets = len(out) // 2
            p._Packetizer__iv_out = fixed + counter.to_bytes(8, "big")
            p._Packetizer__sequence_number_out = (p._Packetizer__sequence_number_out + packets) & 0xFFFFFFFF
            wire = b"".join(out)
            p.write_all(wire)
            p._Packetizer__sent_bytes += len(wire)
            p._Packetizer__sent_packets += packets
            if (p._Packetizer__sent_packets >= p.REKEY_PACKETS or p._Packetizer__sent_bytes >= p.REKEY_BYTES) \
                    and not p._Packetizer__need_rekey:
                p._Packetizer__received_bytes_overflow = 0
                p._Packetizer__received_packets_overflow = 0
                p._trigger_rekey()
