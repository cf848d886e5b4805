"""The end-to-end wire between edge and worker, which the broker carries but never reads.

* ``session_protocol``: the session bodies (open, step, close) and their replies;
* ``codec``: tensors as a small header plus raw zero-copy frames (fp32, fp16, bf16, int8);
* ``crypto``: per-session keys, authenticated encryption, replay windows, key files.

The edge (``edge_worker``) and the worker (``cloud_worker``) both use these modules; the broker
process imports none of them (it routes ``broker/protocol.py`` envelopes only).
"""

# The activation precisions ``codec.WIRE_DTYPES`` implements, named without importing torch (the
# CLI checks --wire-dtype before anything heavy loads).
WIRE_DTYPE_NAMES = ("fp32", "fp16", "bf16", "int8")
