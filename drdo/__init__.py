"""drdo: DRDO preference alignment (plain PyTorch reference, data, models, training).

The plain-PyTorch losses live in :mod:`drdo.losses`; fused kernels in the sibling
package :mod:`drdo_kernels`.
"""
from drdo.losses import dpo_loss, drdo_loss, edpo_loss, oracle_loss, sequence_logprobs

__version__ = "0.1.0"
__all__ = ["sequence_logprobs", "drdo_loss", "oracle_loss", "dpo_loss", "edpo_loss", "__version__"]
