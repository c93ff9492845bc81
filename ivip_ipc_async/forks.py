"""Fork safety: the library's one `os.register_at_fork` hook.

A child forked without exec (a `multiprocessing` helper, `gunicorn --preload`)
inherits the parent's descriptors, flocks and Redis leases. What holds any
registers here, weakly, and is told in the child to let go (closing its copies,
never touching the parent's files, futures or event loop); `generation` is
bumped, so an `AsyncIPC` sees that its backend belongs to the parent without a
`getpid()` per call.

Registrations are the registering process's own: the child calls them once,
then starts with none.

Example:
    >>> from ivip_ipc_async import forks
    >>> class Holder:
    ...     def forget(self) -> None:
    ...         print("let go in the child")
    >>> holder = Holder()
    >>> forks.forget_in_child(holder, Holder.forget)
    >>> forks.discard(holder)  # released: nothing to let go of any more
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Any, Final, TypeVar

__all__ = ["discard", "forget_in_child", "generation"]

T = TypeVar("T")

generation: Final[list[int]] = [0]
"""Bumped in each forked child: `generation[0]` (a list, read on hot paths).

Example:
    >>> from ivip_ipc_async.forks import generation
    >>> generation[0] >= 0
    True
"""

# Instances holding something a child must let go of, each with what does it.
# Weak keys: registering never keeps an instance alive.
_holders: weakref.WeakKeyDictionary[Any, Callable[[Any], None]] = weakref.WeakKeyDictionary()


def forget_in_child(instance: T, forget: Callable[[T], None]) -> None:
    """Call `forget(instance)` in a child forked while `instance` lives.

    `forget` is a plain function or an unbound method (a bound one would keep
    the instance alive). Registering again replaces the previous `forget`.

    Example:
        >>> class Holder:
        ...     def forget(self) -> None: ...
        >>> forget_in_child(Holder(), Holder.forget)  # collected: never called
    """
    _holders[instance] = forget


def discard(instance: object) -> None:
    """Nothing to let go of in a child any more (released, closed). Safe to repeat.

    Example:
        >>> class Holder:
        ...     def forget(self) -> None: ...
        >>> holder = Holder()
        >>> discard(holder)  # never registered: nothing to do
    """
    _holders.pop(instance, None)


def _after_fork_in_child() -> None:
    generation[0] += 1
    holders = list(_holders.items())
    _holders.clear()
    for instance, forget in holders:
        forget(instance)


os.register_at_fork(after_in_child=_after_fork_in_child)
