"""Owns the name a model is served under, derived from the ``--model`` spec alone.

The planner serves ``--model SPEC`` under ``model_name_for_spec(SPEC)`` (the ``{model}``
of the ``plans/{model}`` topic) and ``edgeslice infer --model`` applies the same function,
so a user may give ``infer`` either the name the planner printed or the very spec they
gave the planner. Pure string work: no import of the model, no torch, so the client side
can use it without depending on the planner.
"""

from __future__ import annotations

import re


def sanitize_model_name(raw: str) -> str:
    """A topic-safe model id: lowercase letters, digits, ``-`` and ``_`` only."""
    name = re.sub(r"[^a-z0-9_-]+", "-", raw.lower()).strip("-_")
    return name or "model"


def model_name_for_spec(spec: str) -> str:
    """The name ``--model spec`` is served under.

    ``mobilenetv2`` -> ``mobilenetv2``; ``path/to/net.py:build`` and ``pkg.mod:build``
    -> ``build`` (the callable's name); a name that is already served (``build``) maps
    to itself, so the function can be applied to whatever the user typed.
    """
    text = spec.strip()
    target, sep, attr = text.rpartition(":")
    if sep and target and attr:
        return sanitize_model_name(attr)
    return sanitize_model_name(text)
