"""Entry points for the frameworks users already train with.

* ``dcdkernels.integrations.torchdistill`` (import it to register ``DCDKCRDLoss``,
  ``DCDKDCDLoss``, ``DCDKCoCoRDLoss`` and ``DCDKPCKDLoss`` in torchdistill's loss registry; needs
  ``pip install dcdkernels[torchdistill]``);
* :class:`NTXentMemoryLoss`: drop-in for ``lightly.loss.NTXentLoss(temperature, memory_bank_size)``;
* :class:`CrossBatchMemory`: drop-in for pytorch-metric-learning's ``CrossBatchMemory`` around its
  ``NTXentLoss`` / ``SupConLoss``.

The two drop-ins need neither library: they are this library's MomentumQueue and fused dense op
behind the same constructor and forward.
"""

from .memory_losses import CrossBatchMemory, NTXentMemoryLoss, PMLNTXentLoss, PMLSupConLoss

__all__ = ["CrossBatchMemory", "NTXentMemoryLoss", "PMLNTXentLoss", "PMLSupConLoss"]
