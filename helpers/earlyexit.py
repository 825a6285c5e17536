"""Real early exit: images leave the network at their exit and stop computing.

    EarlyExit(model, thresholds)(images)           # (predicted class [N], exit number 1..10 [N])
    EarlyExitStream(EarlyExit(...))(images)        # the same, every block run on batches of one size
    stream.feed(batch); ...; stream.finish()       # the same, for images that arrive in batches
    LastExitOnly(model)(images)                    # the baseline: every block, the last classifier only
    timed_costs(model, images)                     # each exit's cost in seconds, for policies' searches

Thresholds come from `policies`; the blocks and classifiers are the model's own (through
MSDNet.walk), so the answers equal the full network's exits at those points.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from . import checks, msdnet
from .errors import InputError, InputTypeError, StateError
from .evaluate import scores
from .policies import ExitTime, check_thresholds

__all__ = ["EarlyExit", "EarlyExitStream", "LastExitOnly", "timed_costs"]


class EarlyExit(nn.Module):
    """Inference that stops: after each block the images confident enough leave; the rest go on.

    Args:
        model: an MSDNet (borrowed in eval mode on each call, given back as it came).
        thresholds: one per exit (tensor, list or array; +inf switches an exit off), see policies.
        score: one of evaluate.SCORES.
    Call with float images [N, 3, H, W] in [0, 1]; returns (predicted class [N], exit number 1..n_exits [N]).
    """

    def __init__(self, model: msdnet.MSDNet, thresholds, score: str = "confidence") -> None:
        super().__init__()
        self.model, self.score = model, score
        t = check_thresholds(thresholds, model.n_exits, score).float()
        self.register_buffer("thresholds", t, persistent=False)
        self._off = [math.isinf(v) and v > 0 for v in t.tolist()]  # read once: no host sync per block

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with msdnet.eval_mode(self.model), torch.no_grad():
            predicted = torch.empty(len(x), dtype=torch.long, device=x.device)
            exit_of = torch.empty(len(x), dtype=torch.long, device=x.device)
            alive = torch.arange(len(x), device=x.device)  # original index of each image still computing
            for exit in self.model.walk(x):
                leave, cls = self.decide(exit.number, exit.maps)
                predicted[alive[leave]] = cls[leave]
                exit_of[alive[leave]] = exit.number
                if leave.all():
                    break
                if leave.any():  # only then does the batch shrink (indexing copies every scale's maps)
                    rows = (~leave).nonzero().squeeze(1)
                    alive = alive[rows]
                    exit.maps = [_gather(t, rows) for t in exit.maps]
            return predicted, exit_of

    def decide(self, exit: int, maps: list[Tensor]) -> tuple[Tensor, Tensor]:
        """After block `exit`: which images leave [B] bool, and each image's class [B].
        An exit switched off lets nobody leave and does not run its classifier."""
        n, device = len(maps[-1]), maps[-1].device
        last = exit == self.model.n_exits
        if not last and self._off[exit - 1]:
            return torch.zeros(n, dtype=torch.bool, device=device), torch.zeros(n, dtype=torch.long, device=device)
        logits = self.model.classify(exit, maps)
        if last:
            return torch.ones(n, dtype=torch.bool, device=device), logits.argmax(-1)
        return scores(logits, self.score) >= self.thresholds[exit - 1], logits.argmax(-1)


def _layout(t: Tensor) -> torch.memory_format:
    """The memory format `t` is laid out in, so that copies of its rows keep it."""
    channels_last = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _empty_rows(t: Tensor, n: int) -> Tensor:
    """An uninitialized [n, ...] tensor shaped, typed, placed and laid out as t's rows."""
    return torch.empty((n, *t.shape[1:]), dtype=t.dtype, device=t.device, memory_format=_layout(t))


def _gather(t: Tensor, rows: Tensor, out: Tensor | None = None) -> Tensor:
    """t[rows] [len(rows), ...] in t's memory format, written into `out` when given.
    index_select into a ready output copies whole images; indexing a channels_last tensor is slower."""
    return torch.index_select(t, 0, rows, out=_empty_rows(t, len(rows)) if out is None else out)


class _Queue:
    """Images waiting for one block: their numbers [n] and the block's input maps, in buffers of room for
    one batch, kept from batch to batch (fresh memory for every batch would cost page faults)."""

    def __init__(self, size: int) -> None:
        self.size, self.count = size, 0
        self.numbers: Tensor | None = None
        self.maps: list[Tensor] = []
        self.spare: tuple[Tensor | None, list[Tensor]] | None = None  # a second set of buffers, see keep()
        self.kept: tuple[int, Tensor | None, list[Tensor]] | None = None

    def keep(self) -> None:
        """Remember what waits now, so that restore() can bring it back: until forget(), the buffers holding
        it are not written again (a queue that runs and refills fills its spare buffers)."""
        self.kept = (self.count, self.numbers, self.maps)

    def restore(self) -> None:
        """Back to what waited at keep(); the buffers written since become the spare ones."""
        count, numbers, maps = self.kept
        if self.numbers is not numbers:
            self.spare = (self.numbers, self.maps)
        self.count, self.numbers, self.maps, self.kept = count, numbers, maps, None

    def forget(self) -> None:
        self.kept = None

    def put(self, numbers: Tensor, maps: list[Tensor], rows: Tensor) -> None:
        """Queue the images `rows` [k] (indices into the batch; k <= size - count) of numbers [B] and maps [B, ...]."""
        if self.count == 0 and self.kept is not None and self.kept[0] and self.numbers is self.kept[1]:
            # These buffers hold the images a call may have to give back: write the spare ones instead.
            self.numbers, self.maps, self.spare = *(self.spare or (None, [])), (self.numbers, self.maps)
        if self.count == 0 and not self._fits(maps):  # the first images (or a new device, dtype...) set the buffers
            self.numbers = _empty_rows(numbers, self.size)
            self.maps = [_empty_rows(t, self.size) for t in maps]
        n, k = self.count, len(rows)
        for t, buffer in zip([numbers, *maps], [self.numbers, *self.maps]):
            _gather(t, rows, out=buffer[n : n + k])
        self.count += k

    def _fits(self, maps: list[Tensor]) -> bool:
        return len(maps) == len(self.maps) and all(
            b.shape[1:] == t.shape[1:] and b.dtype == t.dtype and b.device == t.device and _layout(b) == _layout(t)
            for b, t in zip(self.maps, maps))

    def waiting(self) -> tuple[Tensor, list[Tensor]]:
        """The waiting images' numbers [count] and maps [count, ...], as views of the buffers."""
        return self.numbers[: self.count], [t[: self.count] for t in self.maps]


class EarlyExitStream:
    """EarlyExit over a stream of images with every block run on a full batch.

    The images that stay after block k wait until `batch_size` of them have gathered, then go through
    block k+1 together; the answers are EarlyExit's, only the grouping differs. Feed batches as they
    arrive and call `finish` for the answers, or call the stream with all images at once.

    Args:
        early: the EarlyExit whose model, thresholds and score are used.
        batch_size: how many images every block runs on at once, >= 1; only `finish` runs fewer (the last
            ones). One shape per block keeps each block as fast per image as in the full network; the
            stream holds one batch of each block's input in buffers it reuses, and a second set so that a
            call that fails (a block out of memory) can leave the stream as it was.
    """

    def __init__(self, early: EarlyExit, batch_size: int = 100) -> None:
        if not isinstance(early, EarlyExit):
            raise InputTypeError(f"early must be an earlyexit.EarlyExit(model, thresholds), got {type(early).__name__}")
        batch_size = checks.whole(batch_size, "batch_size")
        self.early, self.batch_size = early, batch_size
        self._queues = [_Queue(batch_size) for _ in range(early.model.n_exits)]  # one per block
        self._reset()

    def _reset(self) -> None:
        for queue in self._queues:
            queue.count = 0
        self._done: list[tuple[Tensor, Tensor, int]] = []  # (image numbers, their classes, their exit)
        self._fed = 0
        self._device = next(self.early.model.parameters()).device  # until images arrive

    @contextmanager
    def _all_or_nothing(self):
        """A call that fails (a block out of memory, refused images) leaves the stream as it was before it."""
        fed, device, done = self._fed, self._device, len(self._done)
        for queue in self._queues:
            queue.keep()
        try:
            yield
        except BaseException:
            self._fed, self._device = fed, device
            del self._done[done:]
            for queue in self._queues:
                queue.restore()
            raise
        for queue in self._queues:
            queue.forget()

    @torch.no_grad()
    def feed(self, images: Tensor) -> None:
        """Queue float images [B, 3, H, W] in [0, 1]; every block whose queue holds a full batch runs.
        When it raises, the stream is left as it was before the call."""
        m = self.early.model
        with msdnet.eval_mode(m), self._all_or_nothing():
            x = m.standardize(images)  # checks the images first
            numbers = torch.arange(self._fed, self._fed + len(images), device=images.device)
            self._fed += len(images)
            self._device = images.device
            self._push(1, numbers, [x], torch.arange(len(x), device=x.device))

    @torch.no_grad()
    def finish(self) -> tuple[Tensor, Tensor]:
        """Run what still waits; returns (predicted class [N], exit number 1..n_exits [N]) in feeding order
        for all N images fed since the last finish, and empties the stream. When it raises, the stream is
        left as it was before the call (finish can be called again)."""
        with msdnet.eval_mode(self.early.model), self._all_or_nothing():
            for k, queue in enumerate(self._queues, start=1):  # in block order: stragglers join the next queue
                if queue.count:
                    self._run(k)
        done, n, device = self._done, self._fed, self._device
        self._reset()
        if not done:
            return torch.empty(0, dtype=torch.long, device=device), torch.empty(0, dtype=torch.long, device=device)
        numbers = torch.cat([i for i, _, _ in done])
        if len(numbers) != n:  # every fed image answered exactly once, or the answers below would hold garbage
            raise RuntimeError(f"the stream answered {len(numbers)} of {n} fed images; this is a bug, please report it")
        predicted = torch.empty(n, dtype=torch.long, device=numbers.device)
        exit_of = torch.empty(n, dtype=torch.long, device=numbers.device)
        predicted[numbers] = torch.cat([c for _, c, _ in done])
        exit_of[numbers] = torch.cat([torch.full_like(i, k) for i, _, k in done])
        return predicted, exit_of

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """All images [N, 3, H, W] at once: (predicted class [N], exit number [N]).

        Raises:
            RuntimeError: images were fed and not yet finished (their answers would be lost).
        """
        if self._fed:
            raise StateError(f"{self._fed} fed images wait for finish(): call it before using the stream as a whole")
        try:
            for start in range(0, len(images), self.batch_size):
                self.feed(images[start : start + self.batch_size])
            return self.finish()
        except BaseException:
            self._reset()  # empty, as this call found it
            raise

    def _push(self, block: int, numbers: Tensor, maps: list[Tensor], rows: Tensor) -> None:
        """Queue the images `rows` of a batch (numbers [B], maps [B, ...]) for `block`, which runs each time
        its queue is full."""
        queue = self._queues[block - 1]
        while len(rows):
            k = min(self.batch_size - queue.count, len(rows))
            queue.put(numbers, maps, rows[:k])
            rows = rows[k:]
            if queue.count == self.batch_size:
                self._run(block)

    def _run(self, block: int) -> None:
        """Block `block` and its exit on the images in its queue; those that stay join the next queue."""
        queue, m = self._queues[block - 1], self.early.model
        numbers, state = queue.waiting()
        maps = m.advance(block, state[0] if block == 1 else state)
        leave, cls = self.early.decide(block, maps)
        self._done.append((numbers[leave], cls[leave], block))  # indexing copies: the buffer can be reused
        stay = (~leave).nonzero().squeeze(1)
        if len(stay):  # into later queues only: this one's views stay valid meanwhile
            self._push(block + 1, numbers, maps, stay)
        queue.count = 0


class LastExitOnly(nn.Module):
    """The network as an ordinary classifier: every block, then only the last classifier.

    Call with float images [N, 3, H, W] in [0, 1]; returns logits [N, classes].
    """

    def __init__(self, model: msdnet.MSDNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        with msdnet.eval_mode(self.model), torch.no_grad():
            for exit in self.model.walk(x):
                pass
            return exit.logits


def _wait_for(device: torch.device) -> None:
    """Block until `device` has finished the work queued on it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@torch.no_grad()
def timed_costs(model: msdnet.MSDNet, images: Tensor, repeats: int = 3) -> list[ExitTime]:
    """Each exit's cost in wall-clock seconds per image, every block and classifier timed alone.

    Args:
        images: float [B, 3, H, W] in [0, 1], at the batch size and memory format to be used.
        repeats: timed runs per part after one warm-up; the best is kept.
    Returns:
        one policies.ExitTime per exit, cumulative like msdnet.exit_costs.
    """
    repeats = checks.whole(repeats, "repeats")
    model.check_input(images)
    if len(images) == 0:
        raise InputError("timed_costs needs at least one image to time")
    device = images.device

    def seconds(fn) -> float:
        fn()  # warm-up: the first call of a shape pays for allocation and kernel choice
        best = math.inf
        for _ in range(repeats):
            _wait_for(device)  # a GPU runs asynchronously: the clock starts and stops on finished work
            start = time.perf_counter()
            fn()
            _wait_for(device)
            best = min(best, time.perf_counter() - start)
        return best / len(images)

    costs, total = [], 0.0
    with msdnet.eval_mode(model):
        maps = model.standardize(images)
        for k in range(1, model.n_exits + 1):
            block = seconds(lambda: model.advance(k, maps))
            maps = model.advance(k, maps)
            own = seconds(lambda: model.classify(k, maps))
            total += block + own
            costs.append(ExitTime(k, total, own))
    return costs
