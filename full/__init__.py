"""Paper-scale backend for consistency models. Every formula is imported from cm.py."""
import os
import sys

_parent: int | None = None  # the parent (torchrun's agent) when die_with_parent was armed


def die_with_parent() -> None:
    """Under torchrun (LOCAL_RANK set), on Linux: SIGKILL this worker when its agent dies, so a kill -9 of
    torchrun leaves no worker behind (training on, or waiting in rendezvous for half an hour). Armed
    before the slow imports; parent_alive_or_exit() afterwards covers an agent that died meanwhile."""
    global _parent
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux") or _parent is not None:
        return
    _parent = os.getppid()
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # prctl(PR_SET_PDEATHSIG, SIGKILL)
    except (OSError, AttributeError):
        pass
    parent_alive_or_exit()


def parent_alive_or_exit() -> None:
    """Exit (status 1, one line) when the parent recorded by die_with_parent is gone."""
    if _parent is not None and os.getppid() != _parent:
        print("error: the torchrun agent that started this worker is gone; exiting", file=sys.stderr)
        os._exit(1)
