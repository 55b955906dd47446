"""Triton kernels for fused LRP rule steps (installed as ``lrpc.kernels``).

Each kernel comes with a plain-torch reference it is tested against. The relevance programs run through
the ``eager`` and ``inductor`` backends today; fused rule kernels plug in behind
:func:`lrpc.register_backend`.
"""
