"""certify: the command-line application of ancer.

Certification runs over datasets (resumable, sharded), their results files, reports of
certified-accuracy curves, and merging of shards. It imports ``ancer``; ``ancer`` never
imports it.
"""
