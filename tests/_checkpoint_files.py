"""Shared by the checkpoint tests: rewrite one shard of a written checkpoint in place."""

import json

from safetensors import safe_open
from safetensors.torch import save_file


def rewrite_shard(d, name, fn):
    """Load the shard holding tensor ``name`` of checkpoint folder ``d``, let ``fn`` edit its {name: tensor}
    dict in place, save it back; returns the shard's path."""
    wm = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    f = d / wm[name]
    with safe_open(str(f), "pt") as sf:
        tensors = {k: sf.get_tensor(k) for k in sf.keys()}
    fn(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})
    return f
