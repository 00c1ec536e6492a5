"""Decoding causal LMs for batch jobs: ``decode`` (continuous batching over a slot KV cache,
``rayinfer.decoding.loop``, choosing tokens on the device with ``Sampler``), ``stream`` (the same
loop fed a job's batches one after the other, rows joining as slots free:
``rayinfer.decoding.streaming``) and ``prepare`` (what makes its steps fast on CPUs,
``rayinfer.decoding.fast``); ``supports`` says which models take this path."""

from rayinfer.decoding.fast import prepare
from rayinfer.decoding.loop import decode, supports
from rayinfer.decoding.rows import DecodeStats, Picker, Row
from rayinfer.decoding.sampling import Sampler
from rayinfer.decoding.streaming import stream

__all__ = ["DecodeStats", "Picker", "Row", "Sampler", "decode", "prepare", "stream", "supports"]
