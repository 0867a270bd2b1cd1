"""Cross-check of the new components' goldens against transformers' DSV4 fp32 modules (the ``transformers``
subject's bindings: DeepseekV4MLP for the shared expert, DeepseekV4HyperHead + DeepseekV4RMSNorm + lm_head for
head.lm, DeepseekV4Attention's q modules + DeepseekV4RotaryEmbedding for attn.q_path), case by case, at the
derived "fp32" level. transformers has no block-FP8 linear, no separate embedding module beyond nn.Embedding,
and builds the attended set as a dense mask, so linear.fp8_block, embed and attn.index_set have no counterpart
there; it has no MTP module at all, so mtp.head is "not provided" with that
reason."""

import pytest

pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4",
                    reason="transformers with models.deepseek_v4 (>= 5.17) is not importable")

from conformance.cases import cases_for  # noqa: E402
from conformance.checks.numeric import run_numeric  # noqa: E402
from conformance.subjects.hf import TransformersSubject  # noqa: E402

pytestmark = pytest.mark.transformers


@pytest.fixture(scope="module")
def hf():
    return TransformersSubject()


@pytest.mark.parametrize("component", ["moe.shared_expert", "head.lm", "attn.q_path"])
def test_golden_agrees_with_transformers_fp32(hf, component):
    for case in cases_for(component):
        rows = run_numeric(hf, case)
        r = rows[0]
        if "v4.1" in case.tags:   # transformers has DeepSeek-V4 only: the V4.1 rows say so, never pass
            assert len(rows) == 1 and r.verdict == "not-provided" and "no DeepSeek-V4.1 model" in r.message, \
                r.message
            continue
        assert [r.level for r in rows] == ["fp32"]
        assert r.verdict == "pass", r.message
        ratios = {k: f"{v:.3g}" for k, v in r.metrics.items() if k.endswith("worst_over_bound")}
        assert ratios, r.metrics
        print(f"\n[vs transformers] {case.id}: worst err/bound {ratios}")


def test_mtp_head_not_provided_with_the_reason(hf):
    """transformers' DeepSeek-V4 has no MTP module (it drops the checkpoint's mtp.* weights on load): the row is
    "not provided" with that reason, never a pass."""
    M = hf.M
    assert not any("mtp" in n.lower() or "multitoken" in n.lower() for n in dir(M)), [n for n in dir(M) if "mtp" in
                                                                                       n.lower()]
    assert any("mtp" in p for p in M.DeepseekV4PreTrainedModel._keys_to_ignore_on_load_unexpected)
    assert "mtp.head" not in hf.provides()
    (case, *_) = cases_for("mtp.head")
    (r,) = run_numeric(hf, case)
    assert r.verdict == "not-provided" and "no MTP module" in r.message, r.message
