"""Probes for the bisect_step tests: no torch, no vllm, instant."""

import os


def passing():
    return {"verdict": "pass", "message": "fine"}


def failing():
    return {"verdict": "fail", "message": "broken"}


def from_env():
    return {"verdict": os.environ.get("FAKE_PROBE_VERDICT", "pass"), "message": "from env"}


def raising():
    raise RuntimeError("probe bug")
