"""Fork safety: one `os.register_at_fork` hook for the library, calling what registered."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

# Importing the package with both backends, in a fresh interpreter, counting the
# hooks it registers.
COUNT_HOOKS = textwrap.dedent(
    """
    import json, os, sys
    hooks = []
    real = os.register_at_fork
    def counting(**kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("ivip_ipc_async"):  # (the stdlib registers its own)
            hooks.append([caller, sorted(kwargs)])
        real(**kwargs)
    os.register_at_fork = counting
    import ivip_ipc_async
    import ivip_ipc_async.backends.directory.locks
    import ivip_ipc_async.backends.redis.leases
    print(json.dumps(hooks))
    """
)


def test_the_library_registers_one_fork_hook() -> None:
    out = subprocess.run(
        [sys.executable, "-c", COUNT_HOOKS], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(out.stdout) == [["ivip_ipc_async.forks", ["after_in_child"]]]


# A real fork: the child calls what is registered (live instances, weakly held,
# then the callbacks), the parent nothing; a collected instance is not called.
FORK_AND_TELL = textwrap.dedent(
    """
    import gc, json, os, sys
    from ivip_ipc_async import forks

    calls = []

    class Holder:
        def __init__(self, name):
            self.name = name
        def forget(self):
            calls.append(self.name)

    kept, dropped, discarded = Holder("kept"), Holder("dropped"), Holder("discarded")
    for holder in (kept, dropped, discarded):
        forks.forget_in_child(holder, Holder.forget)
    forks.discard(discarded)
    del dropped
    gc.collect()
    before = forks.generation[0]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, json.dumps({"child": calls, "generation": forks.generation[0]}).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = json.loads(os.read(read, 4096))
    print(json.dumps({**child, "parent": calls, "before": before, "after": forks.generation[0]}))
    """
)


def test_a_forked_child_calls_what_registered_and_the_parent_does_not() -> None:
    out = subprocess.run(
        [sys.executable, "-c", FORK_AND_TELL],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    told = json.loads(out.stdout)
    assert told["child"] == ["kept"]  # not the collected one, nor the discarded one
    assert told["parent"] == []
    assert told["generation"] == told["before"] + 1  # bumped in the child only
    assert told["after"] == told["before"]
