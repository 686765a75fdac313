"""Triton kernels of cpd_fast, installed as the sub-package ``cpd_fast.kernels``.

Only Triton code lives here (no torch.nn). Every kernel has a plain-PyTorch reference next to
its Python wrapper, which tests use as the oracle (on CPU under ``TRITON_INTERPRET=1``).
"""
