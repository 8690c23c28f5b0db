"""Errors that end an engine (importable without torch or the engine itself)."""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine cannot go on (e.g. a tensor-parallel worker died or hung): a
    step re-raises it as it is, never as a StepError blaming one batch, so
    whoever drives the engine stops and answers every request."""
