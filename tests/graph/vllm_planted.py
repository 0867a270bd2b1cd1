"""Planted graph bugs around vLLM's own kernels (the cases of ``conformance.subjects._vllm_graph``), each next to
its correct twin: the graph check must catch them with vLLM's kernels inside the captured region, not only
with the harness's torch components. Test-only: nothing in the product imports it.

* ``vllm_stale_ragged``: the ragged decode metadata (indices, indptr) is copied into the static buffers on the
  first load only, as a metadata builder that skips its copy once a graph exists -> stale: metadata.
* ``vllm_shared_ids``: every captured size reads its top-k ids from one static buffer of the largest size ->
  static buffers shared across captured sizes.

``--subject tests.graph.vllm_planted:factory`` on a GPU (the kernels are compiled, as vllm-triton-gpu:ocp);
``planted_cases(params, profile)`` builds them for any kernel parameters (the CPU test: Triton's interpreter).
"""

from __future__ import annotations

import torch

from conformance.checks import graph as G
from conformance.subjects import Subject, SubjectInfo
from conformance.subjects import _vllm_graph as vg


def _stale(base_cls, planted: bool):
    class StaleRagged(base_cls):
        def load(self, inputs):
            if planted and self.__dict__.get("_loaded"):
                inputs = {k: v for k, v in inputs.items() if k not in ("ind", "ptr")}
            self._loaded = True
            super().load(inputs)
    return StaleRagged


def _shared(planted: bool, builder):
    shared: dict = {}

    class SharedIds(vg.RoutingWrapper):
        def __init__(self, example, device, builder):
            super().__init__(example, device, builder)
            b = example["ids"].shape[0]
            if planted:
                if "ids" not in shared or shared["ids"].shape[0] < b:
                    shared["ids"] = torch.zeros_like(example["ids"], device=device)
                self.static["ids"] = shared["ids"][:b]
    return SharedIds


def planted_cases(p: dict, profile: str) -> list:
    real = {c.name: c for c in vg.vllm_graph_cases(p, profile)}
    out = []
    for planted in (True, False):
        kern = _kernels(p)
        c = vg.sparse_case(p, kern, profile, real["vllm_sparse_decode"].function)
        cls = _stale(vg.SparseDecodeWrapper, planted)
        c.wrapper = lambda ex, dev, cls=cls, kern=kern: cls(ex, dev, p, kern)
        c.name = "vllm_stale_ragged" + ("" if planted else "_twin")
        out.append(_mark(c, planted, G.CAUSE_STALE, "ragged indices / indptr copied on the first load only"))
    builder = _builder(p)
    for planted in (True, False):
        c = vg.routing_case(builder, real["vllm_routing_metadata"].function)
        cls = _shared(planted, builder)
        c.wrapper = lambda ex, dev, cls=cls: cls(ex, dev, builder)
        c.name = "vllm_shared_ids" + ("" if planted else "_twin")
        out.append(_mark(c, planted, G.CAUSE_SHARED, "one static top-k id buffer for every captured size"))
    return out


def _kernels(p):
    from conformance.subjects.vllm_triton import _K

    return {"insert": _K.get("quantize_and_insert_k_kernel", p.get("src")),
            "decode": _K.get("_sparse_attn_decode_ragged_kernel", p.get("src"))}


def _builder(p):
    from conformance.subjects.vllm_triton import _K

    return _K.get("bitmatrix_metadata", p.get("src"))


def _mark(c, planted, cause, what):
    if planted:
        c.mutant, c.expect_cause, c.description = True, cause, what
    else:
        c.twin_of = c.name[: -len("_twin")]
        c.description = f"correct twin of {c.twin_of}"
    c.function = f"tests.graph.vllm_planted:{c.name} around {c.function}"
    return c


class VllmPlantedSubject(Subject):
    name = "vllm-planted-graph"

    def __init__(self):
        from conformance.subjects import load_subject

        self.gpu = load_subject("vllm-triton-gpu:ocp")     # refuses, in one line, without a GPU

    def info(self) -> SubjectInfo:
        i = self.gpu.info()
        return SubjectInfo(name=self.name, implementation=f"planted graph bugs around {i.implementation}",
                           device=i.device, dialect=i.dialect, emulated=False)

    def provides(self) -> dict:
        return {}

    def graph_cases(self) -> list:
        return planted_cases(self.gpu.params(), "ocp")


def factory():
    return VllmPlantedSubject()
