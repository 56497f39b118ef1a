"""Triton kernels of pikv-press, installed as ``pikv_press.kernels``.

Each kernel lives in its own module beside a pure-torch reference implementation, which is the CPU path and the
test oracle; dispatch chooses Triton on CUDA (:mod:`pikv_press.kernels._dispatch`: ``PIKV_KERNELS=auto|torch|triton``
or a ``backend=`` argument). Reference module -> Triton module:

* ``select`` (score, select and compact, uniform or ragged budgets) -> ``select_triton`` (radix select, exact);
* ``sharded_attention`` (partial attention + log-sum-exp merge) -> ``sharded_attention_triton`` (split-K decode);
* ``lowbit.quantize`` (quantize-and-pack) -> ``lowbit_triton`` (bit-exact);
* ``lowbit_attention`` (decode attention over packed KV) -> ``lowbit_triton`` (dequantizes tiles in registers);
* ``latent_attention`` (MLA latent decode) -> ``latent_attention_triton``;
* ``routing_features`` (the routing presses' per-token features, batched over layers) -> ``routing_features_triton``.

The attention kernels share ``attention_triton``. Every kernel is tested against its reference through the Triton
interpreter on the CPU; none has been compiled or timed on a GPU here (``python -m evaluation.kernel_benchmark``).
"""
