#!/usr/bin/env python3
"""Client of the `ledger` service (server.pl), run on lab host c by `scripts/lab ledger
client`. It knows two endpoints (the source's and the target's address, same port) and
fails over between them as a real client with two endpoints does: on any error, reset or
timeout it retries the same write at once on the other endpoint.

  --mode per-request  a NEW connection for every write, paced at --rate writes a second
  --mode stream       ONE long-lived connection, a write every --interval-ms, reconnecting
                      on error

A write is acknowledged when the server answers "OK ID" (after its fsync). Writes are
numbered 1, 2, ...; a write is retried until acknowledged, so numbers are acknowledged in
order. The loop stops by itself after --seconds. Prints one JSON object on stdout: what
was acknowledged (tag and numbers), where, the longest gap between two acknowledgements
(and when it was), connections opened and errors seen."""
import argparse
import json
import socket
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["per-request", "stream"], required=True)
    ap.add_argument("--hosts", required=True, help="ADDR,ADDR: the two endpoints, first first")
    ap.add_argument("--port", type=int, default=8084)
    ap.add_argument("--seconds", type=float, required=True, help="how long to run")
    ap.add_argument("--rate", type=float, default=100.0, help="per-request: writes a second")
    ap.add_argument("--interval-ms", type=float, default=10.0, help="stream: ms between writes")
    ap.add_argument("--timeout", type=float, default=0.5,
                    help="seconds to wait for a connect or an answer before failing over")
    ap.add_argument("--tag", default=None, help="prefix of write IDs (default: from the clock)")
    a = ap.parse_args()
    hosts = a.hosts.split(",")
    if len(hosts) != 2 or not all(hosts):
        ap.error("--hosts takes two addresses")
    tag = a.tag or "w%d" % int(time.time() * 1000)
    interval = 1.0 / a.rate if a.mode == "per-request" else a.interval_ms / 1000.0

    start = time.monotonic()
    end = start + a.seconds
    cur = 0                       # index of the endpoint in use
    sock = None                   # stream mode: the open connection
    rbuf = b""
    seq = 1
    acked = []                    # acknowledged numbers, in order
    by_host = {h: 0 for h in hosts}
    last_ack = None               # (monotonic, wall) of the latest acknowledgement
    max_gap = 0.0
    gap_from = gap_to = None      # wall-clock ends of the longest gap
    connections = 0
    errors = {}
    next_at = start

    def fail(kind):
        nonlocal cur, sock, rbuf
        errors[kind] = errors.get(kind, 0) + 1
        if sock is not None:
            sock.close()
            sock = None
        rbuf = b""
        cur = 1 - cur

    def connect():
        nonlocal connections
        s = socket.create_connection((hosts[cur], a.port), timeout=a.timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connections += 1
        return s

    def read_line(s):
        nonlocal rbuf
        while b"\n" not in rbuf:
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionResetError("closed by the server")
            rbuf += chunk
        line, rbuf = rbuf.split(b"\n", 1)
        return line.decode()

    failed_round = 0              # consecutive failures: after trying both, pause briefly
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if now < next_at:
            time.sleep(next_at - now)
        wid = "%s-%d" % (tag, seq)
        try:
            if sock is None:
                sock = connect()
                rbuf = b""
            sock.settimeout(a.timeout)
            sock.sendall(("W %s\n" % wid).encode())
            answer = read_line(sock)
            if answer != "OK " + wid:
                raise ConnectionError("unexpected answer %r" % answer)
        except socket.timeout:
            fail("timeout")
        except ConnectionRefusedError:
            fail("refused")
        except ConnectionResetError:
            fail("reset")
        except OSError as e:
            fail(type(e).__name__ + ":" + (e.strerror or str(e)))
        else:
            t, w = time.monotonic(), time.time()
            if last_ack is not None and t - last_ack[0] > max_gap:
                max_gap = t - last_ack[0]
                gap_from, gap_to = last_ack[1], w
            last_ack = (t, w)
            acked.append(seq)
            by_host[hosts[cur]] += 1
            seq += 1
            failed_round = 0
            if a.mode == "per-request":
                sock.close()
                sock = None
            next_at = max(next_at + interval, t - interval)
            continue
        # Failed: retry the same write on the other endpoint at once; after both failed,
        # wait a little (both down: the service is moving) rather than spin.
        failed_round += 1
        next_at = time.monotonic() + (0.01 if failed_round % 2 == 0 else 0.0)
    if sock is not None:
        sock.close()
    elapsed = time.monotonic() - start
    json.dump({
        "mode": a.mode,
        "tag": tag,
        "seconds": round(elapsed, 3),
        "acked": len(acked),
        "acked_seqs": acked,
        "acked_by_host": by_host,
        "connections": connections,
        "connections_per_s": round(connections / elapsed, 1),
        "max_gap_s": round(max_gap, 4),
        "max_gap_from": gap_from,
        "max_gap_to": gap_to,
        "errors": errors,
    }, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
