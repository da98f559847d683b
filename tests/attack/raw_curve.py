#!/usr/bin/python3
"""A raw ZMTP 3.0 CURVE client (RFC 23, RFC 26) that does what libzmq never lets a client do:
it sends frames with MORE set and never a last frame, so the server buffers an unfinished
multipart message. Used by tests/tests/identity.rs to attack a real master (SPEC §11).

usage: raw_curve.py HOST PORT SERVER_PUBLIC_Z85 CLIENT_SECRET_Z85 SECONDS [FRAME_BYTES]

Prints `handshake ok` once READY arrives, then `sent N frames B bytes closed=yes|no` when
SECONDS have passed or the server closed the connection.
"""
import os
import socket
import struct
import sys
import time

import zmq
from nacl.public import Box, PrivateKey, PublicKey
from zmq.utils import z85


def command(name, body):
    data = bytes([len(name)]) + name + body
    if len(data) < 256:
        return b"\x04" + bytes([len(data)]) + data
    return b"\x06" + struct.pack(">Q", len(data)) + data


def message_frame(body):
    """A ZMTP message frame (not a command frame): libzmq's CURVE sends each MESSAGE so, with
    the frame's own MORE bit clear; the MORE that counts is the flags byte inside the box."""
    if len(body) < 256:
        return b"\x00" + bytes([len(body)]) + body
    return b"\x02" + struct.pack(">Q", len(body)) + body


def read_exact(sock, n):
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed by the server")
        out += chunk
    return out


def read_command(sock):
    flags = read_exact(sock, 1)[0]
    size = struct.unpack(">Q", read_exact(sock, 8))[0] if flags & 0x02 else read_exact(sock, 1)[0]
    data = read_exact(sock, size)
    return data[1 : 1 + data[0]], data[1 + data[0] :]


def main():
    host, port, server_z85, secret_z85, seconds = sys.argv[1:6]
    frame_bytes = int(sys.argv[6]) if len(sys.argv) > 6 else 0
    server = PublicKey(z85.decode(server_z85))
    client = PrivateKey(z85.decode(secret_z85))
    short = PrivateKey.generate()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"CURVE".ljust(20, b"\x00")
                 + b"\x00" + b"\x00" * 31)
    read_exact(sock, 64)
    nonce = 1
    hello_box = Box(short, server).encrypt(b"\x00" * 64, b"CurveZMQHELLO---" + struct.pack(">Q", nonce))
    sock.sendall(command(b"HELLO", b"\x01\x00" + b"\x00" * 72 + bytes(short.public_key)
                         + struct.pack(">Q", nonce) + hello_box.ciphertext))
    name, body = read_command(sock)
    assert name == b"WELCOME", name
    welcome = Box(short, server).decrypt(body[16:], b"WELCOME-" + body[:16])
    server_short, cookie = PublicKey(welcome[:32]), welcome[32:]
    vouch_nonce = os.urandom(16)
    vouch = Box(client, server_short).encrypt(bytes(short.public_key) + bytes(server),
                                              b"VOUCH---" + vouch_nonce).ciphertext
    metadata = b"\x0bSocket-Type" + struct.pack(">I", 4) + b"PUSH"
    nonce += 1
    initiate = Box(short, server_short).encrypt(
        bytes(client.public_key) + vouch_nonce + vouch + metadata,
        b"CurveZMQINITIATE" + struct.pack(">Q", nonce)).ciphertext
    sock.sendall(command(b"INITIATE", cookie + struct.pack(">Q", nonce) + initiate))
    name, _ = read_command(sock)
    assert name == b"READY", name
    print("handshake ok", flush=True)
    session = Box(short, server_short)
    payload = b"\x01" + b"\x00" * frame_bytes  # flags: MORE, always
    sent = total = 0
    closed = False
    deadline = time.time() + float(seconds)
    batch = []
    try:
        while time.time() < deadline:
            for _ in range(256):
                nonce += 1
                n = struct.pack(">Q", nonce)
                box = session.encrypt(payload, b"CurveZMQMESSAGEC" + n).ciphertext
                batch.append(message_frame(b"\x07MESSAGE" + n + box))
            data = b"".join(batch)
            batch.clear()
            sock.sendall(data)
            sent += 256
            total += len(data)
    except (ConnectionError, OSError):
        closed = True
    print(f"sent {sent} frames {total} bytes closed={'yes' if closed else 'no'}", flush=True)


if __name__ == "__main__":
    main()
