"""`python -m edm_opt.localrun --nproc_per_node=N -m MODULE ARGS...`: N ranks on this machine, sockets on 127.0.0.1.

`torchrun --standalone` hosts its rendezvous store on all interfaces (TCPStore binds the wildcard address whatever
host it is given), so anyone who reaches the machine could join or disturb a job. The single-node runs edm-opt
launches itself (sweep cells with `launch: {mode: torchrun}`, hence `make demo`) start their ranks here instead:
this launcher binds the store's socket to 127.0.0.1 and hands it to rank 0 (TCPStore's `master_listen_fd`), and
pins gloo and NCCL to the loopback interface. The ranks see torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT; OMP_NUM_THREADS=1 unless set, as torchrun does) and die with the launcher.
One rank failing stops the others; the launcher exits with the first failing rank's code. Multi-node jobs use torchrun.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

# Read by `distributed.init` (rank 0 gets STORE_FD; every rank gets LOCALRUN).
LOCALRUN_ENV = "EDM_OPT_LOCALRUN"
STORE_FD_ENV = "EDM_OPT_STORE_FD"
LOOPBACK = "127.0.0.1"


def rank_env(rank: int, world: int, port: int, base: dict[str, str]) -> dict[str, str]:
    """The environment of rank `rank` of `world` on this node, with the store at 127.0.0.1:`port`."""
    env = dict(base)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
               GROUP_RANK="0", MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
               NCCL_SOCKET_IFNAME="lo")
    env[LOCALRUN_ENV] = "1"
    env.pop(STORE_FD_ENV, None)
    if world > 1:
        env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default for several ranks on one node
    return env


def run(nproc: int, command: list[str]) -> int:
    """Start `nproc` ranks of `command` (argv after the interpreter), wait for them; the exit code of the first rank
    that failed, or 0. SIGTERM/SIGINT to the launcher are passed on to every rank."""
    if nproc < 1:
        raise ValueError(f"--nproc_per_node must be >= 1, got {nproc}")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    sock.listen(max(nproc, 8))
    port = sock.getsockname()[1]
    procs: list[subprocess.Popen] = []
    try:
        for rank in range(nproc):
            env = rank_env(rank, nproc, port, os.environ)
            fds: tuple[int, ...] = ()
            if rank == 0:
                env[STORE_FD_ENV] = str(sock.fileno())
                fds = (sock.fileno(),)
            procs.append(subprocess.Popen([sys.executable, *command], env=env, pass_fds=fds))
    finally:
        sock.close()  # rank 0 holds its own copy of the listening socket

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        pending, failed = {p.pid: p for p in procs}, 0
        while pending:
            pid, status = os.wait()  # in the order the ranks end (resumed after a forwarded signal)
            p = pending.pop(pid, None)
            if p is None:
                continue
            p.returncode = os.waitstatus_to_exitcode(status)
            if p.returncode != 0 and not failed:
                failed = p.returncode
                forward(signal.SIGTERM, None)  # one rank failed: the others would wait in a collective forever
        return failed
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    usage = "usage: python -m edm_opt.localrun [--nproc_per_node=N] (-m MODULE | SCRIPT) ARGS..."
    nproc, i = 1, 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-m":
        opt = argv[i]
        if opt in ("-h", "--help"):
            print(usage + "\n\n" + __doc__)
            return 0
        name, _, value = opt.partition("=")
        if name not in ("--nproc_per_node", "--nproc-per-node"):
            print(f"{usage}\nerror: unknown option {name}", file=sys.stderr)
            return 2
        if not value:
            i += 1
            value = argv[i] if i < len(argv) else ""
        try:
            nproc = int(value)
        except ValueError:
            nproc = 0
        if nproc < 1:
            print(f"{usage}\nerror: --nproc_per_node must be a positive integer, got {value!r}", file=sys.stderr)
            return 2
        i += 1
    if i >= len(argv):
        print(f"{usage}\nerror: no command", file=sys.stderr)
        return 2
    code = run(nproc, argv[i:])
    return code if code >= 0 else 128 - code  # a rank killed by signal N: 128 + N, as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
