"""A per-process fair queue for one upstream's permits: round-robin across users, FIFO within a user.

The queue is per process on purpose: waiting is local (an asyncio future per request), only the permits are
shared. One dispatcher task, alive while anyone waits, offers each free permit to the next user in turn — the
head of the first user's deque takes the store's permit, then that user moves to the back of the rotation — so a
user with fifty queued requests delays another user's single request by one turn at most. A user the store
refuses for holding its fair share (`over_share`) passes its turn to the next user; one whose own breaker is open
hears it, alone. It asks the store again when a request joins or a permit is released in this process
(`notify`), and every `poll_seconds()` for permits that other processes released. docs/resilience.md discusses
the choice.
"""

import asyncio
from collections import deque
from contextlib import suppress
from dataclasses import dataclass

from quotas.store.base import PERMIT_ACQUIRED, PERMIT_FULL


@dataclass(eq=False)
class Waiter:
    user: object
    holder: str
    future: asyncio.Future
    queued: bool = True


class FairQueue:
    def __init__(self, try_acquire, give_back, poll_seconds):
        """`try_acquire(user, holder)` asks the store for a permit (a PermitResult); `give_back(user, holder,
        result)` returns one acquired for a waiter that has gone meanwhile; `poll_seconds()` reads the setting."""
        self._try_acquire = try_acquire
        self._give_back = give_back
        self._poll_seconds = poll_seconds
        self._users: dict[object, deque] = {}  # insertion order is the rotation
        self._wake = asyncio.Event()
        self._task = None
        self.length = 0

    async def wait(self, user, holder, timeout, first=False):
        """Wait for this request's turn: returns an ACQUIRED or OPEN result; TimeoutError after `timeout`.

        `first`: at the head of its user's line (a retry has waited its turn already).
        """
        waiter = Waiter(user, holder, asyncio.get_running_loop().create_future())
        waiters = self._users.setdefault(user, deque())
        if first:
            waiters.appendleft(waiter)
        else:
            waiters.append(waiter)
        self.length += 1
        self._wake.set()  # a permit may be free to this user even though others wait (fair shares)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._dispatch())
        try:
            async with asyncio.timeout(timeout):
                return await waiter.future
        except BaseException:
            # Granted in the same instant as the timeout or cancellation: hand the permit back.
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None \
                    and future.result().status == PERMIT_ACQUIRED:
                await asyncio.shield(self._give_back(user, holder, future.result()))
            raise
        finally:
            self._remove(waiter)

    def notify(self):
        """A permit was released in this process: the next waiter may have it."""
        self._wake.set()

    def users(self):
        """The users waiting here now."""
        return list(self._users)

    def _remove(self, waiter):
        if not waiter.queued:
            return
        waiter.queued = False
        self.length -= 1
        waiters = self._users[waiter.user]
        waiters.remove(waiter)
        if not waiters:
            del self._users[waiter.user]

    def _head(self, user):
        """The head of `user`'s deque, dropping waiters that gave up; None when none is left."""
        while (waiters := self._users.get(user)) is not None:
            waiter = waiters[0]
            if not waiter.future.done():
                return waiter
            self._remove(waiter)
        return None

    def _grant(self, waiter, result=None, error=None):
        user = waiter.user
        self._remove(waiter)
        if user in self._users:  # to the back of the rotation
            self._users[user] = self._users.pop(user)
        if waiter.future.done():
            return False
        if error is not None:
            waiter.future.set_exception(error)
        else:
            waiter.future.set_result(result)
        return True

    async def _dispatch(self):
        while self._users:
            # Cleared before asking, so a release or an arrival during the store calls is not missed.
            self._wake.clear()
            if not await self._round():
                with suppress(TimeoutError):
                    async with asyncio.timeout(self._poll_seconds()):
                        await self._wake.wait()

    async def _round(self):
        """Offer a free permit to each user in turn, until one takes it; False if none did."""
        for user in list(self._users):
            waiter = self._head(user)
            if waiter is None:
                continue
            try:
                result = await self._try_acquire(user, waiter.holder)
            except Exception as error:  # the store failed closed: this waiter gets the error
                self._grant(waiter, error=error)
                return True
            if result.status == PERMIT_ACQUIRED:
                if not self._grant(waiter, result):
                    await self._give_back(user, waiter.holder, result)
                return True
            if result.status == PERMIT_FULL:
                if result.over_share:
                    continue  # this user holds its fair share: the next one may have the permit
                return False
            if result.own:  # the user's own breaker opened: all its requests hear it now
                while (other := self._head(user)) is not None:
                    self._grant(other, result)
                continue
            while (other := self._next()) is not None:  # the shared breaker opened: everyone waiting hears it now
                self._grant(other, result)
            return True
        return False

    def _next(self):
        """The head of the first user's deque (dropping waiters that gave up)."""
        for user in list(self._users):
            if (waiter := self._head(user)) is not None:
                return waiter
        return None
