"""Keep one service process running (infra/local-stack.sh starts every service through this).

    supervise.py --name worker --state DIR [--user U] [--stop-signal TERM] [--stop-all] [--grace 20] -- CMD...

- starts CMD (as `--user` when given: its uid, gid and groups; the environment is the one this
  process got, which local-stack.sh builds explicitly for each service);
- when CMD exits on its own (crash, `kill -9`, a worker giving up after a database outage), every
  process it left behind is stopped (flow runs of a Prefect worker: they must not keep training
  for a worker that is gone), then CMD is started again after a back-off (1 s, doubling to
  `--max-delay`; back to 1 s once a start lived `--stable` seconds);
- SIGTERM / SIGINT: stop for good. CMD gets `--stop-signal` (with `--stop-all` every descendant
  gets it at once: a Prefect worker would otherwise wait for its flow runs), then after `--grace`
  seconds everything left is killed;
- SIGHUP: restart CMD now (after a rotation of its credentials).

This process is a child subreaper (prctl PR_SET_CHILD_SUBREAPER): whatever CMD starts stays
its descendant even when CMD dies, so nothing can outlive the service. `DIR/NAME.child` holds
the pid of the running CMD, `DIR/NAME.state` one JSON line (child, starts, last exit).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import pwd
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36


def log(name: str, msg: str) -> None:
    print(f"=== {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} supervise {name}: {msg}", file=sys.stderr,
          flush=True)


def descendants(root: int) -> list[int]:
    """Every live process below `root` (from /proc), deepest last."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses
        fields = stat[stat.rfind(")") + 2:].split()
        if fields and fields[0] != "Z":
            parent[int(entry)] = int(fields[1])
    out, frontier = [], [root]
    while frontier:
        children = [p for p, pp in parent.items() if pp in frontier and p != root]
        out += children
        frontier = children
    return out


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def write_atomic(path: str, text: str) -> None:
    """Readers (`local-stack.sh status`, the tests) never see a half-written file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def reap() -> list[tuple[int, int]]:
    """Collect every exited child (CMD, and orphans re-parented to us); [(pid, status)]."""
    done = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return done
        if pid == 0:
            return done
        done.append((pid, status))


def stop_leftovers(name: str, grace: float) -> None:
    """TERM whatever is left below us, KILL it after `grace` seconds."""
    me = os.getpid()
    left = descendants(me)
    if not left:
        return
    log(name, f"stopping {len(left)} leftover process(es): {left[:10]}")
    signal_all(left, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        reap()
        if not descendants(me):
            return
        time.sleep(0.1)
    left = descendants(me)
    log(name, f"killing {len(left)} process(es) that ignored SIGTERM")
    signal_all(left, signal.SIGKILL)
    time.sleep(0.2)
    reap()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--state", required=True, help="directory for NAME.child and NAME.state")
    ap.add_argument("--user", help="run CMD as this user (needs root)")
    ap.add_argument("--stop-signal", default="TERM")
    ap.add_argument("--stop-all", action="store_true", help="send the stop signal to every descendant at once")
    ap.add_argument("--grace", type=float, default=20.0, help="seconds between the stop signal and SIGKILL")
    ap.add_argument("--max-delay", type=float, default=30.0)
    ap.add_argument("--stable", type=float, default=60.0)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no command")
    stop_sig = getattr(signal, "SIG" + args.stop_signal.upper().removeprefix("SIG"))

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log(args.name, "warning: cannot become a child subreaper; orphans of a crash escape to init")

    popen_user: dict = {}
    if args.user:
        pw = pwd.getpwnam(args.user)
        popen_user = {"user": pw.pw_uid, "group": pw.pw_gid,
                      "extra_groups": os.getgrouplist(pw.pw_name, pw.pw_gid)}

    state = {"stopping": False, "restart": False, "child": None}

    def on_stop(signum, frame):
        state["stopping"] = True
        child = state["child"]
        if child is None:
            return
        targets = [child.pid, *descendants(os.getpid())] if args.stop_all else [child.pid]
        signal_all(sorted(set(targets)), stop_sig)

    def on_hup(signum, frame):
        state["restart"] = True
        if state["child"] is not None:
            signal_all([state["child"].pid], stop_sig)

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)

    child_file = os.path.join(args.state, f"{args.name}.child")
    state_file = os.path.join(args.state, f"{args.name}.state")
    starts, delay, last_exit = 0, 1.0, None
    while not state["stopping"]:
        started = time.monotonic()
        try:
            child = subprocess.Popen(cmd, close_fds=True, **popen_user)
        except OSError as e:
            log(args.name, f"cannot start {cmd[0]}: {e}")
            return 1
        state["child"] = child
        starts += 1
        write_atomic(child_file, f"{child.pid}\n")
        write_atomic(state_file, json.dumps({"child": child.pid, "starts": starts, "last_exit": last_exit}) + "\n")
        if starts > 1:
            log(args.name, f"started again (start {starts}), pid {child.pid}")
        stop_deadline = None
        status = None
        while status is None:
            for pid, st in reap():
                if pid == child.pid:
                    status = st
            if status is not None:
                break
            if state["stopping"] and stop_deadline is None:
                stop_deadline = time.monotonic() + args.grace
            if stop_deadline is not None and time.monotonic() > stop_deadline:
                log(args.name, f"pid {child.pid} did not stop within {args.grace:g} s: killing it")
                signal_all([child.pid, *descendants(os.getpid())], signal.SIGKILL)
                stop_deadline = float("inf")
            time.sleep(0.1)
        state["child"] = None
        code = os.waitstatus_to_exitcode(status)
        last_exit = code
        write_atomic(state_file, json.dumps({"child": None, "starts": starts, "last_exit": code}) + "\n")
        stop_leftovers(args.name, grace=5.0 if not state["stopping"] else 2.0)
        if state["stopping"]:
            break
        if state["restart"]:
            state["restart"] = False
            log(args.name, "restarting on request (SIGHUP)")
            delay = 1.0
            continue
        if time.monotonic() - started >= args.stable:
            delay = 1.0
        what = f"signal {-code}" if code < 0 else f"status {code}"
        log(args.name, f"pid {child.pid} exited with {what}; starting it again in {delay:g} s")
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and not state["stopping"]:
            time.sleep(0.1)
        delay = min(delay * 2, args.max_delay)
    for path in (child_file,):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    log(args.name, "stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
