#!/usr/bin/python3
"""Connect to HOST PORT (retrying while nothing listens yet), send "ping",
read one line, print it. Gives up after TIMEOUT seconds in all.

    tcpget.py HOST PORT TIMEOUT
"""
import socket
import sys
import time

host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + timeout
while True:
    try:
        s = socket.create_connection((host, port), timeout=max(1, deadline - time.monotonic()))
        break
    except OSError as e:
        if time.monotonic() >= deadline:
            sys.exit(f"tcpget: {e}")
        time.sleep(0.5)
s.settimeout(max(1, deadline - time.monotonic()))
s.sendall(b"ping\n")
data = b""
try:
    while b"\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
except OSError as e:
    sys.exit(f"tcpget: {e} after {data!r}")
print(data.decode(errors="replace").strip())
