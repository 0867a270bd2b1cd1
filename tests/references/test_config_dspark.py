"""DSpark config fields (issue #18): the public V4.1-Flash text_config's DSpark block parses into DSV4Config (it was
refused as unknown before dspark_block_size / dspark_noise_token_id existed), round-trips, and bad values are
refused naming the field."""

import json

import pytest

from references.checkpoints.hf_config import from_hf_dict, to_hf_dict
from references.config import TINY_V41, ConfigError

# the DSpark fields of the public DeepSeek-V4.1-Flash config.json text_config (docs/dspark.md), on TINY_V41's
# dimensions except the vocabulary (the noise id 128799 needs the 129280-token vocabulary)
PUBLIC_DSPARK = {"num_nextn_predict_layers": 3, "dspark_block_size": 5, "dspark_noise_token_id": 128799,
                 "dspark_target_layer_ids": [2, 3, 4], "dspark_markov_rank": 256, "dspark_n_routed_experts": 128,
                 "dspark_num_experts_per_tok": 3}


def _hf(**text):
    d = json.loads(json.dumps(to_hf_dict(TINY_V41)))
    d["text_config"].update(vocab_size=129280, **text)
    # the three MTP / DSpark layers are sliding-window (MTP entries may be omitted, attention.py:313-318)
    return d


def test_public_dspark_fields_parse():
    c, _ = from_hf_dict(_hf(**PUBLIC_DSPARK))
    assert (c.dspark_block_size, c.dspark_noise_token_id, c.dspark_target_layer_ids, c.dspark_markov_rank,
            c.dspark_n_routed_experts, c.dspark_num_experts_per_tok, c.num_nextn_predict_layers) == \
        (5, 128799, (2, 3, 4), 256, 128, 3, 3)


def test_dspark_fields_round_trip():
    c, _ = from_hf_dict(_hf(**PUBLIC_DSPARK))
    c2, _ = from_hf_dict(json.loads(json.dumps(to_hf_dict(c))))
    assert c2 == c


def test_n_mtp_layers_alias_is_the_draft_layer_count():
    # nvidia/dspark.py:89-93 reads n_mtp_layers, else num_nextn_predict_layers
    kw = dict(PUBLIC_DSPARK)
    del kw["num_nextn_predict_layers"]
    d = _hf(n_mtp_layers=3, **kw)
    del d["text_config"]["num_nextn_predict_layers"]   # TINY_V41 writes 0
    c, _ = from_hf_dict(d)
    assert c.num_nextn_predict_layers == 3


@pytest.mark.parametrize("kw, msg", [
    ({"dspark_noise_token_id": 129280}, r"dspark_noise_token_id: must be a token id in \[0, vocab_size=129280\)"),
    ({"dspark_noise_token_id": -1}, r"dspark_noise_token_id: must be a token id"),
    ({"dspark_block_size": -2}, r"dspark_block_size: must be >= 0, got -2"),
    ({"dspark_num_experts_per_tok": 129}, r"dspark_num_experts_per_tok: must be in \[1, dspark_n_routed_experts=128\]"),
    ({"dspark_target_layer_ids": [2, 9]}, r"dspark_target_layer_ids"),
])
def test_bad_dspark_fields_refused_naming_the_field(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        from_hf_dict(_hf(**dict(PUBLIC_DSPARK, **kw)))
