r"""One-off converter of the LAION aesthetic predictor head (a torch pickle) to safetensors.

  python -m mgrpo_jax.rewards.convert_aesthetic --input sac+logos+ava1-l14-linearMSE.pth \
      --output /models/aesthetic_head

The published head is a torch state dict; it is read once here with
`torch.load(weights_only=True)` (no code is unpickled) and written as `model.safetensors`, the
only format the library reads. Needs torch; the library itself does not.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from mgrpo_jax.rewards.device import AESTHETIC_LAYERS


def convert(input_path: str, output_dir: str) -> list[str]:
  """Writes output_dir/model.safetensors; returns the tensor names.

  Raises:
    ValueError: the state dict lacks a layer of the expected MLP (named) or has a wrong shape.
  """
  import torch  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  state = torch.load(input_path, map_location="cpu", weights_only=True)
  state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
  tensors = {}
  for index, n_in, n_out in AESTHETIC_LAYERS:
    for leaf in ("weight", "bias"):
      name = f"layers.{index}.{leaf}"
      if name not in state:
        raise ValueError(f"{input_path}: no tensor {name}; expected the LAION aesthetic MLP "
                         f"(layers {[i for i, _, _ in AESTHETIC_LAYERS]})")
      value = state[name].float().numpy()
      if leaf == "weight" and value.shape[0] != n_out or (index and leaf == "weight" and
                                                          value.shape[1] != n_in):
        raise ValueError(f"{input_path}: {name} has shape {value.shape}, expected "
                         f"({n_out}, {n_in if index else 'CLIP embedding width'})")
      tensors[name] = np.ascontiguousarray(value)
  os.makedirs(output_dir, exist_ok=True)
  save_file(tensors, os.path.join(output_dir, "model.safetensors"))
  return sorted(tensors)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--input", required=True)
  parser.add_argument("--output", required=True)
  args = parser.parse_args(argv)
  names = convert(args.input, args.output)
  print(f"wrote {len(names)} tensors to {args.output}/model.safetensors")


if __name__ == "__main__":
  main()
