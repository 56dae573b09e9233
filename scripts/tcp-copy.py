#!/usr/bin/env python3
# plain TCP copy of N bytes of a file over loopback, written to a file on the other side
# (fsynced). With SEND_CPU / RECV_CPU the sending and receiving threads are pinned to
# those cores, as the benchmark pins the head and the worker.
import socket, sys, threading, time, os
src, n, dst = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def pin(var):
    if os.environ.get(var):
        os.sched_setaffinity(0, {int(os.environ[var])})
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
port = srv.getsockname()[1]
def recv():
    pin("RECV_CPU")
    c, _ = srv.accept()
    with open(dst, "wb") as f:
        got = 0
        while got < n:
            b = c.recv(1 << 20)
            if not b: break
            f.write(b); got += len(b)
        f.flush(); os.fsync(f.fileno())
t = threading.Thread(target=recv); t.start()
pin("SEND_CPU")
t0 = time.time()
s = socket.create_connection(("127.0.0.1", port))
with open(src, "rb") as f:
    left = n
    while left > 0:
        b = f.read(min(1 << 20, left)); s.sendall(b); left -= len(b)
s.close(); t.join()
dt = time.time() - t0
print(f"{n/1e6:.1f} MB in {dt:.3f} s = {n/1e6/dt:.0f} MB/s")
