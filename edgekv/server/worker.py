"""One engine, many clients: requests queue for the model's single engine in arrival order.

The engine runs on one thread of its own; the HTTP side submits jobs to a bounded queue (a full queue is
refused at once, `QueueFull`) and reads each job's events (text pieces, then the outcome) from an asyncio
queue fed from that thread. A job is cancelled by its client (a disconnect), by its deadline, or by
shutdown; generation then stops at the next token, and the engine's cache stays the conversation's
tokens so far.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from edgekv.api import Model, Reply
from edgekv.runtime.sampling import SamplingConfig
from edgekv.server.conversations import ConversationStore

log = logging.getLogger("edgekv.server")


class QueueFull(Exception):
    pass


@dataclass
class Job:
    """One request's work: the rendered prompt text and how to sample its reply."""

    id: str
    text: str
    prompt_tokens: int
    max_tokens: int
    sampling: SamplingConfig
    stop: tuple[str, ...]
    deadline: float  # time.monotonic() after which it is cancelled
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # ("text", str), then ("done", Outcome) or ("error", Failure)
    cancel: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)

    def cancelled(self) -> bool:
        return self.cancel.is_set() or time.monotonic() > self.deadline

    def emit(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


@dataclass
class Failure:
    reason: str
    timed_out: bool = False


@dataclass
class Outcome:
    reply: Reply
    reused_tokens: int
    queue_wait_s: float
    timed_out: bool


class EngineWorker:
    def __init__(self, model: Model, store: ConversationStore, queue_size: int):
        self.model, self.store = model, store
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self.running: Job | None = None
        self.thread = threading.Thread(target=self._serve, name="edgekv-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    @property
    def depth(self) -> int:
        """Requests waiting or running."""
        return self.jobs.qsize() + (self.running is not None)

    def _serve(self) -> None:
        while (job := self.jobs.get()) is not None:
            self.running = job
            try:
                self._run(job)
            except Exception as e:  # the job's client gets the reason; the next job starts from a clean cache
                log.exception("request %s failed", job.id)
                self.model.engine.reset()
                job.emit("error", Failure(f"generation failed: {e}"))
            finally:
                self.running = None

    def _run(self, job: Job) -> None:
        started = time.monotonic()
        if job.cancelled():
            timed_out = not job.cancel.is_set()
            job.emit("error", Failure("timed out in the queue" if timed_out else "cancelled", timed_out))
            return
        placed = self.store.place(job.text)
        reply = self.model.extend(placed.new, job.max_tokens, job.sampling, job.stop,
                                  on_text=lambda piece: job.emit("text", piece), cancelled=job.cancelled)
        timed_out = reply.finish_reason == "cancelled" and not job.cancel.is_set()
        if reply.finish_reason == "cancelled":
            log.info("%s stopped after %d tokens (%s)", job.id, len(reply.tokens),
                     "timed out" if timed_out else "cancelled")
        job.emit("done", Outcome(reply, placed.reused, started - job.submitted, timed_out))

    def shutdown(self) -> None:
        """Cancel the running job and every queued one, and stop the thread."""
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel.set()
                job.emit("error", Failure("the server is shutting down"))
        if self.running is not None:
            self.running.cancel.set()
        self.jobs.put(None)
        self.thread.join()
