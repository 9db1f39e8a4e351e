"""The bridge between HTTP requests and the decoding engine: one thread decodes, requests wait on queues.

Every request becomes a `Job` of one or more sequences. `Scheduler.submit` admits it to a bounded waiting line
(or refuses at once, so the server answers 429 instead of piling up work); the decoding thread moves waiting
jobs into the engine's free slots between steps and runs `Engine.step` in a loop, so concurrent requests share
each forward pass. Chunks go back to each request's asyncio queue through its event loop. Cancelling a job (the
client left, or its time ran out) frees its slots before the next step. Stopping the scheduler ends the thread
after its current step and sends every job still waiting or decoding `STOPPED`, so no request waits for tokens
that will never come.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque

from lmforge.generate import Engine, Sequence

STOPPED = ("stopped", None)  # the event a job gets when the scheduler stops before the job has finished


class Overloaded(Exception):
    """The waiting line is full."""


class Job:
    """One request's sequences and the queue their chunks arrive on: (choice index, Chunk) or ("error", message)."""

    def __init__(self, sequences: list[Sequence], loop: asyncio.AbstractEventLoop, stream: bool = True):
        self.sequences = sequences
        self.loop = loop
        self.stream = stream  # False: only each sequence's final chunk is sent (the rest is in the Sequence)
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        for index, seq in enumerate(sequences):
            seq.tag = (self, index)

    def put(self, item) -> bool:
        """Hand item to the request's event loop; False when that loop has closed (the server is going away)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:
            return False
        return True


class Scheduler:
    def __init__(self, engine: Engine, max_queue: int):
        self.engine = engine
        self.max_queue = max_queue
        self.waiting: deque[Job] = deque()
        self.to_cancel: list[Job] = []
        self.condition = threading.Condition()
        self.stopping = False
        self.errors = 0
        self.thread = threading.Thread(target=self._run, name="lmforge-decode", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """End the decoding thread after its current step; unfinished jobs get STOPPED. Calling it again is harmless."""
        with self.condition:
            self.stopping = True
            self.condition.notify()
        if self.thread.is_alive():
            self.thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        """Queue job for decoding, or raise Overloaded when max_queue jobs already wait (after stop(): STOPPED)."""
        with self.condition:
            if self.stopping:
                job.put(STOPPED)
                return
            if self.full:
                raise Overloaded
            self.waiting.append(job)
            self.condition.notify()

    @property
    def full(self) -> bool:
        return len(self.waiting) >= self.max_queue

    def cancel(self, job: Job) -> None:
        """Stop job's sequences; their slots are free before the next step."""
        with self.condition:
            if job.cancelled:
                return
            job.cancelled = True
            if job in self.waiting:
                self.waiting.remove(job)
            else:
                self.to_cancel.append(job)
            self.condition.notify()

    def stats(self) -> dict:
        with self.condition:
            return {
                "active": self.engine.active,
                "waiting": len(self.waiting),
                "steps": self.engine.steps,
                "tokens_generated": self.engine.tokens_generated,
                "errors": self.errors,
            }

    def _admit(self) -> None:
        for job in self.to_cancel:
            for seq in job.sequences:
                self.engine.cancel(seq)
        self.to_cancel.clear()
        while self.waiting and self.engine.free >= len(self.waiting[0].sequences):
            for seq in self.waiting.popleft().sequences:
                self.engine.add(seq)

    def _run(self) -> None:
        while True:
            with self.condition:
                while not (self.stopping or self.waiting or self.to_cancel or self.engine.active):
                    self.condition.wait()
                if self.stopping:
                    for job in {*self.waiting, *(seq.tag[0] for seq in self.engine.slots if seq is not None)}:
                        job.put(STOPPED)
                    return
                self._admit()
            try:
                events = self.engine.step()
            except Exception as exc:  # out of memory or a bug: fail the requests in the batch, keep serving
                with self.condition:
                    self.errors += 1
                    for seq in [s for s in self.engine.slots if s is not None]:
                        self.engine.cancel(seq)
                        seq.tag[0].put(("error", f"generation failed: {type(exc).__name__}: {exc}"))
                continue
            for seq, chunk in events:
                job, index = seq.tag
                if (job.stream or chunk.finish_reason is not None) and not job.put((index, chunk)):
                    for other in job.sequences:  # nobody is left to read it
                        self.engine.cancel(other)
