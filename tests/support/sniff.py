"""Capture every frame on every interface of the namespace it runs in (AF_PACKET), until SIGTERM;
then write them to OUT, one length-prefixed frame each. For tests that check what a relay sees."""
from __future__ import annotations

import signal
import socket
import struct
import sys


def main(out_path: str) -> None:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))  # ETH_P_ALL
    sock.settimeout(0.2)
    frames: list[bytes] = []
    running = True

    def stop(*_: object) -> None:
        nonlocal running
        running = False
    signal.signal(signal.SIGTERM, stop)
    print("capturing", flush=True)
    while running:
        try:
            frames.append(sock.recv(65535))
        except socket.timeout:
            continue
    with open(out_path, "wb") as out:
        for frame in frames:
            out.write(struct.pack("!I", len(frame)) + frame)


def read_frames(path: str) -> list[bytes]:
    data = open(path, "rb").read()
    frames, i = [], 0
    while i + 4 <= len(data):
        (n,) = struct.unpack("!I", data[i:i + 4])
        frames.append(data[i + 4:i + 4 + n])
        i += 4 + n
    return frames


if __name__ == "__main__":
    main(sys.argv[1])
