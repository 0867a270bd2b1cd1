"""V4.1 Engram against the installed vLLM: the golden's layout functions give EngramLayout's primes / offsets and
compute_hash_multipliers' multipliers on the case configs; vllm-triton:<profile> binds vLLM's hash kernel and the
lookup + gate kernels, and they pass every fast case (the hash bit for bit, the rows exactly, out within the
emulated bound); a planted kernel that reads the table as fnuz is diagnosed."""

import importlib.util
import types

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not installed in this Python (vLLM subjects are exercised by nox -s cpu)",
                allow_module_level=True)

import torch  # noqa: E402

from conformance.cases import cases_for  # noqa: E402
from conformance.cases.engram import FLASH, TINY, layout  # noqa: E402
from conformance.checks.numeric import run_numeric  # noqa: E402

pytestmark = pytest.mark.usefixtures("needs_vllm_triton")


@pytest.mark.parametrize("cfg", [TINY, FLASH], ids=["tiny", "flash"])
def test_layout_equals_vllms(cfg):
    import vllm.models.deepseek_v41.common.engram as E

    c = types.SimpleNamespace(
        engram_layer_ids=cfg["layer_ids"], engram_num_embeddings=(10**7,) * len(cfg["layer_ids"]),
        engram_max_ngram_size=cfg["max_ngram_size"], engram_n_heads=cfg["n_heads"], engram_head_dim=cfg["head_dim"],
        engram_compressed_vocab_size=cfg["compressed_vocab_size"], engram_pad_token_id=cfg["pad_token_id"],
        engram_vocab_size=cfg["engram_vocab_size"])
    lay = E.EngramLayout(c)
    mine = layout(cfg)
    assert torch.equal(torch.tensor(lay.primes).reshape(len(cfg["layer_ids"]), -1), mine["primes"])
    assert torch.equal(lay.offsets.long(), mine["offsets"])
    assert torch.equal(E.compute_hash_multipliers(lay.layer_ids, lay.max_ngram_size, lay.compressed_vocab_size),
                       mine["multipliers"])


@pytest.mark.parametrize("component", ["engram.hash", "engram.memory"])
def test_vllm_triton_binds_and_passes(component):
    from conformance.subjects.vllm_triton import VllmTritonSubject

    s = VllmTritonSubject("gfx942")
    assert component in s.provides()
    for case in cases_for(component):
        if case.tier != "fast":
            continue
        rows = run_numeric(s, case)
        assert [r.verdict for r in rows] == ["pass"] * len(rows), [r.message for r in rows]


def test_planted_fnuz_table_read_is_diagnosed(monkeypatch):
    """The lookup kernel given the table bytes viewed as float8_e4m3fnuz (what a platform-dtype 'normalisation'
    of the table would do on gfx942): x0.5 named on the rows. (Triton 3.9's interpreter decodes fnuz 0x80 as -0,
    where MI300 hardware reads NaN, so the NaN-at-0x80 half of the diagnosis shows only with the golden-level
    mutant, tests/harness/test_engram_mutants.py.)"""
    from conformance.subjects import vllm_triton as vt

    real = vt.make_engram_memory

    def planted(p):
        fn = real(p)

        def wrong(stream, hash_ids, table, table_scale, wkv, q_weight, k_weight, token_mask, *, eps):
            orig = torch.Tensor.view

            def view(self, *a, **k):
                if a and a[0] is torch.float8_e4m3fn and self.dtype == torch.uint8:
                    return orig(self, torch.float8_e4m3fnuz)
                return orig(self, *a, **k)

            monkeypatch.setattr(torch.Tensor, "view", view)
            try:
                return fn(stream, hash_ids, table, table_scale, wkv, q_weight, k_weight, token_mask, eps=eps)
            finally:
                monkeypatch.setattr(torch.Tensor, "view", orig)
        return wrong

    monkeypatch.setitem(vt.KERNELS, "engram_memory", (planted,) + vt.KERNELS["engram_memory"][1:])
    s = vt.VllmTritonSubject("gfx942")
    case = cases_for("engram.memory")[0]
    rows = run_numeric(s, case)
    assert all(r.verdict in ("fail", "catastrophic") for r in rows)
    assert all("ratio signature: x0.5" in r.message for r in rows), [r.message for r in rows]

