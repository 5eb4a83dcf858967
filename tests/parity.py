"""Shared helpers of the PyTorch parity tests."""

import numpy as np


def rel_err(ours, reference) -> float:
  """max |ours - reference| / max |reference|, in float64."""
  a, b = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def randomise_norms_and_biases(model, extra=()) -> None:
  """Moves a torch model's norm scales off 1 and its biases (and `extra` names) off 0.

  Fresh torch models initialise these to constants, which would let a loader that swaps or drops
  them pass a parity test.
  """
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias") or any(e in name for e in extra):
        p.copy_(torch.randn_like(p) * 0.2 +
                (1.0 if "norm" in name and name.endswith("weight") else 0.0))
