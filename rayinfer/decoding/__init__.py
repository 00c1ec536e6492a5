"""Decoding causal LMs for batch jobs: ``decode`` (continuous batching over a slot KV cache,
``rayinfer.decoding.loop``, choosing tokens on the device with ``Sampler``) and ``prepare`` (what makes its steps fast on CPUs,
``rayinfer.decoding.fast``); ``supports`` says which models take this path."""

from rayinfer.decoding.fast import prepare
from rayinfer.decoding.loop import DecodeStats, Picker, decode, supports
from rayinfer.decoding.sampling import Sampler

__all__ = ["DecodeStats", "Picker", "Sampler", "decode", "prepare", "supports"]
