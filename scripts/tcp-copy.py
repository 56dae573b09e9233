#!/usr/bin/env python3
# plain TCP copy of N bytes of a file over loopback, written to a file on the other side
# and timed to its last write, as exo times a slice's transfer (neither includes the
# flush to disk that follows; SYNC=1 adds an fsync to the copy's time): the sender with sendfile (no copy through user space), the receiver in its
# own process reading into one reused buffer (no GIL between them). With SEND_CPU /
# RECV_CPU the two processes are pinned to those cores, as the benchmark pins the head
# and the worker.
import os, socket, sys, time
src, n, dst = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def pin(var):
    if os.environ.get(var):
        os.sched_setaffinity(0, {int(os.environ[var])})
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
port = srv.getsockname()[1]
child = os.fork()
if child == 0:
    pin("RECV_CPU")
    c, _ = srv.accept()
    buf = bytearray(4 << 20); view = memoryview(buf)
    with open(dst, "wb") as f:
        got = 0
        while got < n:
            k = c.recv_into(view)
            if k == 0: break
            f.write(view[:k]); got += k
        f.flush()
        if os.environ.get("SYNC") == "1":
            os.fsync(f.fileno())
    os._exit(0 if got == n else 1)
pin("SEND_CPU")
t0 = time.time()
s = socket.create_connection(("127.0.0.1", port))
with open(src, "rb") as f:
    s.sendfile(f, 0, n)
s.close()
_, status = os.waitpid(child, 0)
dt = time.time() - t0
if status != 0:
    sys.exit("the receiver got fewer bytes than sent")
print(f"{n/1e6:.1f} MB in {dt:.3f} s = {n/1e6/dt:.0f} MB/s")
