"""A plugin subject (public Subject/Impl API) whose ``norm.rms`` misbehaves on one case, chosen by
DSV4_CRASH_MODE: ``segv`` (a real segmentation fault: reads address 0), ``abort``, ``exit3`` (``os._exit(3)``),
``hang`` (sleeps forever), ``memory`` (raises MemoryError), ``good`` (the fp64 golden: passes), ``pool`` (the golden,
after the factory has used torch's thread pool in the pytest process: a forked case must still finish). Every other case
(and every mode on the other cases) computes the golden, so only the planted case can fail."""

import ctypes
import os
import signal
import time

from conformance.subjects import Impl, Subject, SubjectInfo, load_subject

TARGET_TOKENS = 7           # norm.rms/t7d256/outliers/s1


class Crashy(Subject):
    name = "crashy"

    def __init__(self):
        self.mode = os.environ.get("DSV4_CRASH_MODE", "good")
        self.golden = load_subject("reference").provides()["norm.rms"].fn
        if self.mode == "pool":           # use torch's CPU thread pool here, before any case is forked
            import torch

            torch.set_num_threads(2)
            x = torch.randn(2000, 2000)
            float(x.to(torch.float64).sum())

    def info(self):
        return SubjectInfo("crashy", f"crash test subject ({self.mode})", "cpu", "none", False)

    def comparison_level(self):
        return "fp64"

    def provides(self):
        def rms(x, weight, *, eps):
            if x.shape[0] == TARGET_TOKENS:
                print(f"crashy: about to misbehave ({self.mode})", flush=True)
                if self.mode == "segv":
                    ctypes.string_at(0)
                elif self.mode == "abort":
                    os.kill(os.getpid(), signal.SIGABRT)
                elif self.mode == "exit3":
                    os._exit(3)
                elif self.mode == "hang":
                    while True:
                        time.sleep(1)
                elif self.mode == "memory":
                    raise MemoryError("crashy: planted out-of-memory")
            return self.golden(x=x, weight=weight, eps=eps)
        return {"norm.rms": Impl(rms, function="tests.harness.crash_subjects.rms", backend="torch")}


def crashy():
    return Crashy()
