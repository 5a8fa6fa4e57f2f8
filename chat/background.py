"""The start-up fine-tune in the background: the chat answers from the weights it loaded while a copy trains.

The run trains a new LoRA adapter on a deep copy of the serving model (`TrainingTwin`), never on the module that
answers: peft keeps one active adapter per module and training flips `requires_grad`, modes and the active adapter,
so sharing the module would corrupt replies or the run. When the run (and its report's probes, which run on the copy
too) is done, the finished adapter folder is loaded into the serving model between two replies.

On 2 CPU cores two torch thread teams running at once slow each other badly, so the run and the chat take turns
(`Turns`): a reply or command waits for the current training step to end, and the run waits at its next step
boundary until no reply is in progress.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from agentscope.credential import CredentialBase
from agentscope.model import ChatModelBase

from chat.startup import status_line
from hfmodel.adapters import AdapterSet
from hfmodel.common import FineTuneInterrupted, UserError, logger
from hfmodel.generation import ENGINES, create_engine
from huggingface_model import FineTuneResult, HuggingFaceWrapper

MODES = ("background", "wait")  # the script's `startup_fine_tune` setting
THREAD_NAME = "startup-fine-tune"


class QuietRun(logging.Filter):
    """The run's info lines would land in the middle of the user's typing or a reply: only its warnings show (the
    status line and the report say the rest)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.threadName != THREAD_NAME


class Turns:
    """Replies and the background run take turns on the CPU (one torch thread team at a time).

    The run takes its turn when it starts and offers it at every step (or evaluation batch) boundary (`take`); a
    reply (`reply()`) announces itself, waits for the step in progress to end, and keeps the turn until it is done.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._replies = 0  # replies waiting or running
        self._training = False

    @contextmanager
    def reply(self) -> Iterator[None]:
        with self._cond:
            self._replies += 1
            try:
                self._cond.wait_for(lambda: not self._training)
            except BaseException:  # Ctrl-C while waiting: no longer waiting
                self._replies -= 1
                self._cond.notify_all()
                raise
        try:
            yield
        finally:
            with self._cond:
                self._replies -= 1
                self._cond.notify_all()

    def take(self) -> None:
        """The run's side, at each step boundary: hold the turn, after every waiting reply has finished."""
        with self._cond:
            if self._training and not self._replies:
                return
            self._training = False
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._replies == 0)
            self._training = True

    def release(self) -> None:
        with self._cond:
            self._training = False
            self._cond.notify_all()


@contextmanager
def own_random_state() -> Iterator[None]:
    """A reply reseeds torch's global generator (same history -> same reply); put the run's state back after it, so
    that replies during a background run do not change what the run draws (dropout, shuffling)."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(state)


class TrainingTwin(HuggingFaceWrapper):
    """A wrapper over a deep copy of the host's weights, with a copy of its adapter set: trains and probes without
    touching what serves replies. Loads nothing."""

    def __init__(self, host: HuggingFaceWrapper) -> None:
        ChatModelBase.__init__(self, credential=CredentialBase(), model=host.model,
                               parameters=host.parameters.model_copy(), stream=host.stream, max_retries=0)
        self.formatter = host.formatter
        self.config_name = host.config_name
        self.model_id, self.local_model_path = host.model_id, host.local_model_path
        self.data_path = host.data_path
        self.system_prompt = host.system_prompt
        self.fine_tune_config = host.fine_tune_config
        self.handle = dataclasses.replace(host.handle, module=copy.deepcopy(host.handle.module),
                                          lock=threading.Lock())
        self.adapter_set = AdapterSet(self.handle, host.adapter_set.name_prefix)
        self.adapter_set.records = dict(host.adapter_set.records)
        self.adapter_set.active = host.adapter_set.active
        self.engine = create_engine(next((n for n, c in ENGINES.items() if type(host.engine) is c), "transformers"),
                                    self.handle)
        self._reply_state(host.pure_tools)


@dataclasses.dataclass
class Outcome:
    """How a background run ended: a result (and its prepared report), or one line to show."""

    result: FineTuneResult | None = None
    report: Any = None  # what `prepare_report` made, shown at the swap
    message: str | None = None  # interrupted / failed: the line to show
    stopped: bool = False  # interrupted (Ctrl-C, exit): not a failure
    error: Exception | None = None  # our own bug: logged with its traceback when shown


class BackgroundFineTune:
    """One fine-tune on a `TrainingTwin`, in a thread, taking turns with the chat (see the module docstring).

    `work(twin, progress, stop)` trains (and prepares the report); `progress` is the trainer's step/log callback and
    is where the run pauses for replies and notices `stop`.
    """

    def __init__(self, host: HuggingFaceWrapper, work: Callable[[HuggingFaceWrapper, Callable[[dict[str, Any]], None],
                                                                  threading.Event], tuple[FineTuneResult, Any]]) -> None:
        self.turns = Turns()
        self.stop = threading.Event()
        self.began = time.perf_counter()
        self.state: dict[str, Any] = {}
        self.outcome: Outcome | None = None
        self._done = threading.Event()
        self._work = work
        self._twin: HuggingFaceWrapper | None = TrainingTwin(host)
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._quiet = QuietRun()

    def start(self) -> None:
        """Start the run (once; later calls do nothing)."""
        if not self.started:
            self.began = time.perf_counter()
            logger.addFilter(self._quiet)
            self._thread.start()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def progress(self, info: dict[str, Any]) -> None:
        """The trainer's step/log callback: record the state, give waiting replies their turn, stop when asked."""
        self.state.update({k: v for k, v in info.items() if k in ("step", "max_steps", "loss", "eval_loss")})
        self.pause()

    def pause(self) -> None:
        self.turns.take()
        if self.stop.is_set():
            raise KeyboardInterrupt  # the recipe turns it into FineTuneInterrupted and discards the half-run

    def status(self) -> str:
        """One line: where the run is."""
        return status_line(self.state, time.perf_counter() - self.began)

    def finish(self, timeout: float | None = None) -> Outcome | None:
        """Stop the run (at its next step boundary) and wait for it: the outcome, or None if it did not end in time."""
        self.stop.set()
        if not self.started:
            return None
        self._done.wait(timeout)
        return self.outcome if self.done else None

    def _run(self) -> None:
        outcome = Outcome()
        try:
            # Holds the CPU from the start: the run imports trl/peft/datasets and builds its trainer, and Python's
            # import machinery hands a half-imported module to one of two threads importing interlinked modules at
            # once (trl's lazy attributes then fail). A reply meanwhile waits for the first step boundary.
            self.pause()
            assert self._twin is not None
            outcome.result, outcome.report = self._work(self._twin, self.progress, self.stop)
        except FineTuneInterrupted as e:
            outcome.message, outcome.stopped = str(e), True
        except KeyboardInterrupt:  # stopped outside the trainer (while preparing, or between probes)
            outcome.stopped = True
            outcome.message = "The start-up fine-tune was stopped before it finished; still serving the previous " \
                              "weights."
        except UserError as e:
            outcome.message = str(e)
        except Exception as e:  # noqa: BLE001 - our bug: shown as one line, its traceback logged, the chat goes on
            outcome.error = e
        finally:
            self.turns.release()
            logger.removeFilter(self._quiet)
            self._twin = None  # the copy's weights are freed as soon as the run ends
            self.outcome = outcome
            self._done.set()
