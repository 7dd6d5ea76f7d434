#!/usr/bin/python3
"""A one-name DNS server on 127.0.0.1:53 (UDP) for the suite's network
namespace: answers A queries for NAME with ADDRESS, NXDOMAIN otherwise.
passt forwards the guest's queries to 10.0.2.3 to this resolver.

    dns.py NAME ADDRESS
"""
import socket
import sys

name, addr = sys.argv[1].lower().rstrip("."), socket.inet_aton(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 53))
while True:
    q, peer = s.recvfrom(512)
    if len(q) < 12:
        continue
    # The question: labels up to a zero byte, then type and class.
    i, labels = 12, []
    while i < len(q) and q[i] != 0:
        labels.append(q[i + 1:i + 1 + q[i]].decode(errors="replace"))
        i += 1 + q[i]
    qend = i + 5
    if qend > len(q):
        continue
    qtype = q[i + 1:i + 3]
    hit = ".".join(labels).lower() == name and qtype == b"\x00\x01"
    flags = b"\x81\x80" if hit else b"\x81\x83"
    head = q[:2] + flags + b"\x00\x01" + (b"\x00\x01" if hit else b"\x00\x00") + b"\x00\x00\x00\x00"
    answer = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + addr if hit else b""
    s.sendto(head + q[12:qend] + answer, peer)
