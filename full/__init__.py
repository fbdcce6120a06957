"""Paper-scale backend for consistency models. Every formula is imported from cm.py."""
import os
import signal
import sys

_armed = False


def _stopped_while_starting(signum, frame):
    name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    raise SystemExit(f"error: stopped by {name} while starting; nothing was written")


if sys.argv[:1] == ["-m"]:  # python -m full.<tool>: a signal during the imports (seconds) is one line too;
    for _s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):  # cm.interrupts_as_errors
        if _s is not None and (_s != getattr(signal, "SIGHUP", None) or signal.getsignal(_s) is not
                               signal.SIG_IGN):  # takes over once main() runs; nohup's SIGHUP stays ignored
            signal.signal(_s, _stopped_while_starting)


def die_with_parent() -> None:
    """A torchrun worker (TORCHELASTIC_RUN_ID set) on Linux: SIGKILL it when its agent dies, so a kill -9
    of torchrun leaves no worker behind (training on, or waiting in rendezvous for many minutes). Armed
    before the slow imports; parent_alive_or_exit() covers an agent that died before or after that."""
    global _armed
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux") or _armed:
        return
    _armed = True
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # prctl(PR_SET_PDEATHSIG, SIGKILL)
    except (OSError, AttributeError):
        pass
    parent_alive_or_exit()


def parent_alive_or_exit() -> None:
    """Exit (status 1, one line) when an armed worker's parent is no longer a torchrun agent: after the
    agent's death the worker is re-parented (to init or a subreaper), which the death signal misses if
    the agent died before it was armed."""
    if not _armed:
        return
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as fh:
            parent = fh.read()
    except OSError:
        return
    if b"torch" not in parent:  # torchrun, or python -m torch.distributed.run
        print("error: the torchrun agent that started this worker is gone; exiting", file=sys.stderr)
        os._exit(1)
