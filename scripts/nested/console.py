#!/usr/bin/python3
"""Drive a VM's serial console the way a person at a terminal would.

    console.py LOG TIMEOUT STEP... -- COMMAND...

runs COMMAND (bhyve or qemu with the console on stdio) and performs the
steps in order against its output:

    expect=REGEX   wait until the output (after the previous match) matches
    send=TEXT      type TEXT on the console (\\n, \\r are understood)
    sh=COMMAND     run a shell command on this side; it must succeed
    signal=NAME    send a signal (TERM, INT...) to COMMAND
    at=NAME        print "at NAME SECONDS" (time since start) for benchmarks

Everything the console printed goes to LOG. The last line printed is
"exit N" (COMMAND's status), or "FAIL: why". TIMEOUT bounds the whole run:
then COMMAND gets SIGINT and, 10 s later, SIGKILL (a SIGTERM would only
press the guest's power button).
"""
import os
import re
import select
import signal
import subprocess
import sys
import time


def main():
    log_path, timeout = sys.argv[1], float(sys.argv[2])
    sep = sys.argv.index("--")
    steps, cmd = sys.argv[3:sep], sys.argv[sep + 1:]
    start = time.monotonic()
    deadline = start + timeout
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    out = bytearray()
    pos = 0
    log = open(log_path, "ab", buffering=0)

    def pump(until):
        """Read output until `until` (monotonic) or EOF; False on EOF."""
        while True:
            left = until - time.monotonic()
            if left <= 0:
                return True
            r, _, _ = select.select([proc.stdout], [], [], min(left, 1.0))
            if r:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    return False
                out.extend(chunk)
                log.write(chunk)
                return True

    def stop(why):
        print(f"FAIL: {why}", flush=True)
        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass  # already gone
        sys.exit(1)

    for step in steps:
        kind, _, arg = step.partition("=")
        if kind == "expect":
            pat = re.compile(arg.encode())
            while True:
                m = pat.search(out, pos)
                if m:
                    pos = m.end()
                    break
                if time.monotonic() >= deadline:
                    stop(f"timed out waiting for /{arg}/")
                if not pump(deadline) and not pat.search(out, pos):
                    proc.wait()
                    stop(f"exit {proc.returncode} before /{arg}/")
        elif kind == "send":
            text = arg.replace("\\n", "\n").replace("\\r", "\r").encode()
            try:
                proc.stdin.write(text)
                proc.stdin.flush()
            except BrokenPipeError:
                stop("console closed")
        elif kind == "sh":
            r = subprocess.run(["sh", "-c", arg], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT,
                               timeout=max(1, deadline - time.monotonic()))
            log.write(b"\n[sh " + arg.encode() + b"]\n" + r.stdout)
            if r.returncode != 0:
                stop(f"'{arg}' failed ({r.returncode}): {r.stdout.decode(errors='replace').strip()}")
        elif kind == "signal":
            proc.send_signal(getattr(signal, "SIG" + arg))
        elif kind == "at":
            print(f"at {arg} {time.monotonic() - start:.3f}", flush=True)
        else:
            stop(f"unknown step {step}")
    while pump(deadline):
        if proc.poll() is not None:
            break
        if time.monotonic() >= deadline:
            stop("timed out waiting for the exit")
    try:
        status = proc.wait(max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        stop("output closed but the command did not exit")
    print(f"exit {status}", flush=True)


if __name__ == "__main__":
    main()
