"""The DALI executor of a loader: a producer thread reads and prepares steps, DALI decodes and augments.

One :class:`DaliExecutor` per loader keeps the built pipeline (reused by later epochs) and the iterations in
flight. Per pass: producer thread -> ``feed_input`` -> ``schedule_run``, keeping ``prefetch`` iterations in
flight; the first ``schedule_run`` of a new pipeline is primed (see :meth:`DaliExecutor.run`). If DALI fails,
the in-flight batches are redone by the torch path (:func:`engine.data.torch_executor.batch_from_item`).
"""

from __future__ import annotations

import collections
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch


def _dali_to_torch(tl, kind: str, dev: torch.device) -> torch.Tensor:
    t = tl.as_tensor()
    if kind == "gpu":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        out = torch.empty(t.shape(), dtype=torch.float32, device=dev)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(dev))
        return out
    return torch.from_numpy(np.array(t))


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


class DaliExecutor:
    """The DALI state of one loader: its pipeline, whether that was primed, and the items in flight."""

    def __init__(self, loader):
        self.loader = loader
        self.pipe = None  # DALI pipeline, built on first iteration and reused
        self.inflight: collections.deque = collections.deque()  # items of scheduled iterations (None: padding)
        self.primed = False

    def close(self) -> None:
        """Drop the pipeline (its threads and, on GPU, its memory); the next pass builds a new one."""
        had_gpu_pipe = self.pipe is not None and self.loader._kind == "gpu"
        self.pipe, self.primed = None, False
        self.inflight.clear()
        if had_gpu_pipe:  # DALI keeps freed device memory in its own pool, out of torch's reach: hand it back
            try:
                from nvidia.dali.backend import ReleaseUnusedMemory

                ReleaseUnusedMemory()
            except (ImportError, AttributeError, RuntimeError):  # older DALI: the pool is kept
                pass

    def _produce(self, plan, start, q: queue.Queue, stop: threading.Event) -> None:
        """Producer thread: prepare each step and read its encoded files (overlapping file I/O)."""
        ld = self.loader

        def read(i):
            return np.fromfile(ld.folder.files[i], dtype=np.uint8)

        try:
            with ThreadPoolExecutor(max(1, min(8, ld.num_threads))) as readers:
                for step in range(start, len(plan)):
                    item = ld._prepare(step, plan[step])
                    item["idx"] = plan[step]
                    item["encoded"] = list(readers.map(read, plan[step]))
                    if not _put(q, item, stop):
                        return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            _put(q, exc, stop)

    def run(self, plan, start):
        """Yield the batches of steps ``start..`` of ``plan``.

        Iterations still in flight from an abandoned pass are drained (discarded) first. If DALI fails (an
        image that passed the index-time check cannot be decoded: changed on disk, corrupt entropy data), the
        in-flight batches are redone by the torch path from the bytes already read, with the same parameters
        and the undecodable samples replaced, and a fresh pipeline takes over from the next step; a failure
        with no undecodable image is re-raised.
        """
        from .torch_executor import batch_from_item

        ld = self.loader
        q: queue.Queue = queue.Queue(maxsize=ld.prefetch + 1)
        stop = threading.Event()
        total = len(plan) - start
        taken = 0

        def next_item():
            nonlocal taken
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            taken += 1
            return item

        def feed(pipe, item):
            for name, value in ld._dali_feed(item).items():
                pipe.feed_input(name, value)

        def fill(pipe, inflight):
            """Schedule up to ``prefetch`` iterations (priming a new pipeline, see below)."""
            want = min(ld.prefetch - len(inflight), total - taken)
            if want <= 0:
                return
            if not self.primed:
                # DALI's first schedule_run runs prefetch_queue_depth iterations at once: feed that many,
                # padding with copies of the last batch (marked None, drained later) on a short epoch.
                items = [next_item() for _ in range(want)]
                for item in items + [items[-1]] * (ld.prefetch - len(items)):
                    feed(pipe, item)
                pipe.schedule_run()
                self.primed = True
                inflight.extend(items + [None] * (ld.prefetch - len(items)))
                return
            for _ in range(want):
                item = next_item()
                feed(pipe, item)
                pipe.schedule_run()
                inflight.append(item)

        thread = threading.Thread(target=self._produce, args=(plan, start, q, stop), name="engine.data.producer",
                                  daemon=True)
        thread.start()
        try:
            if self.pipe is not None:
                while self.inflight:  # leftovers of an abandoned pass, or priming padding
                    self.pipe.outputs()
                    self.inflight.popleft()
            done = 0
            while done < total:
                if self.pipe is None:
                    self.pipe, self.primed = ld._build_pipeline(), False
                    self.inflight.clear()
                pipe, inflight = self.pipe, self.inflight
                fill(pipe, inflight)
                try:
                    # GPU: outputs bound to torch's current stream (no host sync); CPU: host-synchronised
                    outs = (
                        pipe.outputs(cuda_stream=torch.cuda.current_stream(ld.device))
                        if ld._kind == "gpu"
                        else pipe.outputs()
                    )
                except Exception as exc:
                    pending = [it for it in inflight if it is not None]
                    self.close()
                    redone = [batch_from_item(ld, it, dali_error=exc) for it in pending]
                    if not any(bad for _, bad in redone):
                        raise RuntimeError(
                            f"DALI pipeline failed on {ld.folder.root} with every image of the "
                            f"in-flight batches decodable: {exc}"
                        ) from exc
                    for batch, _ in redone:
                        done += 1
                        yield batch
                    continue
                item = inflight.popleft()
                tensors = [_dali_to_torch(o, ld._kind, ld.device) for o in outs]
                del outs  # DALI's output buffers go back to its pool now, not after the consumer's step
                if taken < total:
                    fill(pipe, inflight)
                done += 1
                yield ld._assemble(tensors, item)
        except GeneratorExit:  # abandoned mid-epoch: in-flight iterations are tracked and drained next time
            raise
        except BaseException:  # a failure may leave fed-but-unscheduled inputs: start afresh next time
            self.close()
            raise
        finally:
            stop.set()
            thread.join(timeout=5)
