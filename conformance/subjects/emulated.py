"""The ``emulated:<profile>`` subject: a numerics model of the vLLM serving path for a platform profile.

``emulated:gfx942`` models MI300X: float8_e4m3fnuz bytes, fmax 240 (224 for the indexer q), OCP
checkpoint weights converted as on MI300X, bf16 activations. ``emulated:ocp`` models the OCP platforms.
It runs on the CPU and says so: every row it produces is marked emulated, with the profile's dialect.
"""

from __future__ import annotations

import platform

import torch

from references.numerics import PROFILES

from .. import components
from .base import Impl, Subject, SubjectError, SubjectInfo


class EmulatedSubject(Subject):
    def __init__(self, profile: str):
        if profile not in PROFILES:
            raise SubjectError(f"unknown emulation profile {profile!r}; known: {sorted(PROFILES)}")
        self.profile = profile
        self.name = f"emulated:{profile}"

    def info(self) -> SubjectInfo:
        return SubjectInfo(name=self.name,
                           implementation=f"CPU emulation of the {self.profile} serving numerics",
                           device=f"cpu ({platform.processor() or platform.machine()}), emulating {self.profile}",
                           dialect=PROFILES[self.profile]["dialect"], emulated=True, profile=self.profile,
                           versions={"torch": torch.__version__})

    def provides(self) -> dict[str, Impl]:
        out = {}
        for name, spec in components.load_all().items():
            if spec.stream is not None:
                if spec.stream.emulate is not None:
                    st = spec.stream.emulate(self.profile)
                    out[name] = Impl(st, function=f"{st.step.__module__}.{st.step.__qualname__}",
                                     backend="emulation", note=f"profile {self.profile}, streamed")
                continue
            if spec.emulate is None:
                continue
            fn = spec.emulate(self.profile)
            out[name] = Impl(fn, function=f"{fn.__module__}.{getattr(fn, '__qualname__', name)}",
                             backend="emulation", note=f"profile {self.profile}")
        return out

    def dialect_probes(self):
        """FP8 producers and consumers of every DSV4 edge, in this profile's serving numerics."""
        from ..checks.dialect.emulated import reference_consumers, reference_producers

        return reference_producers(self.profile), reference_consumers(self.profile)

    def emulation_profile(self) -> str | None:
        # it *is* the emulation: comparing it against itself would be a check that cannot fail
        return None

    def comparison_level(self) -> str:
        return "serving"
