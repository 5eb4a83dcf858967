"""Optional Weights & Biases logging beside metrics.jsonl and TensorBoard.

Enabled by `config.log.wandb_project` (with `pip install -e ".[wandb]"`); `metrics.MetricWriter`
forwards the same scalars (per iteration, non-finite values as NaN) and image grids, and the
resolved config is the W&B run config. Only the writer of process 0 exists, so a multi-host run
is one W&B run. The run id is kept in `WORKDIR/wandb_run_id`, so a resumed run continues the
same W&B run. The usual environment applies: `WANDB_API_KEY`, `WANDB_MODE=offline` (files under
`WORKDIR/wandb`, `wandb sync` later), `WANDB_ENTITY`.
"""

from __future__ import annotations

import math
import os
import secrets
from typing import Any, Mapping, Sequence

import numpy as np

_RUN_ID_FILE = "wandb_run_id"


class WandbWriter:
  """One W&B run for a workdir."""

  def __init__(self, project: str, workdir: str, config: Mapping[str, Any] | None = None,
               entity: str | None = None):
    try:
      import wandb  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError(f"config.log.wandb_project={project!r} needs the wandb package: "
                        "pip install -e \".[wandb]\" (or set log.wandb_project='')") from e
    self._wandb = wandb
    id_path = os.path.join(workdir, _RUN_ID_FILE)
    if os.path.isfile(id_path):
      with open(id_path) as f:
        run_id = f.read().strip()
    else:
      run_id = secrets.token_hex(4)  # W&B ids: letters, digits, - and _
      with open(id_path, "w") as f:
        f.write(run_id)
    self.run = wandb.init(project=project, entity=entity or None, dir=workdir, id=run_id,
                          resume="allow", name=os.path.basename(os.path.abspath(workdir)),
                          config=dict(config or {}))

  def write_scalars(self, step: int, record: Mapping[str, Any]) -> None:
    """record: name -> float or None (non-finite, as in metrics.jsonl); logged as NaN."""
    self.run.log({k: (math.nan if v is None else float(v)) for k, v in record.items()
                  if k != "step"}, step=int(step))

  def write_image(self, step: int, name: str, grid: np.ndarray,
                  captions: Sequence[str] | None = None) -> None:
    """grid: uint8 [H, W, 3], the captioned grid TensorBoard gets."""
    caption = " | ".join(captions) if captions else None
    self.run.log({name: self._wandb.Image(np.asarray(grid), caption=caption)}, step=int(step))

  def close(self) -> None:
    if self.run is not None:
      self.run.finish()
      self.run = None


def from_config(config, workdir: str) -> WandbWriter | None:
  """The writer `config.log.wandb_project` asks for, or None (unset or empty)."""
  project = config.log.get("wandb_project", "") if config is not None else ""
  if not project:
    return None
  to_dict = getattr(config, "to_dict", None)
  return WandbWriter(project, workdir, to_dict() if to_dict else dict(config))
