"""Flow-matching noise schedules (SD3's shifted sigmas) and per-step sampler choices.

The schedule reproduces diffusers' `FlowMatchEulerDiscreteScheduler.set_timesteps` for SD3
(no dynamic shifting): the inference sigmas are spaced linearly in the *unshifted* timestep
between 1 and the shifted training sigma_min, then shifted. sigma_min is therefore shifted
twice, which is what diffusers does and what SD3.5 checkpoints were tuned with.
"""

from __future__ import annotations

import numpy as np


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
  """SD3's timestep shift `shift * s / (1 + (shift - 1) * s)` (identity for shift=1)."""
  sigmas = np.asarray(sigmas, np.float64)
  return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def flow_match_sigmas(num_steps: int, shift: float = 3.0,
                      num_train_timesteps: int = 1000) -> np.ndarray:
  """Sigmas of a T-step flow-matching sampler, from 1 down to 0.

  Args:
    num_steps: T, the number of denoising steps.
    shift: SD3 timestep shift (3.0 for SD3/SD3.5-Medium).
    num_train_timesteps: training timesteps of the scheduler (1000).

  Returns:
    float32 numpy [T + 1]: sigma_0 = 1 > sigma_1 > ... > sigma_{T-1} > sigma_T = 0. Step i moves
    the latent from sigma_i to sigma_{i+1}; the model's timestep is `1000 * sigma_i`.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  if shift <= 0:
    raise ValueError(f"shift must be > 0, got {shift}")
  sigma_min = float(shift_sigmas(np.array(1.0 / num_train_timesteps), shift))
  sigmas = np.linspace(1.0, sigma_min, num_steps)
  sigmas = shift_sigmas(sigmas, shift)
  return np.append(sigmas, 0.0).astype(np.float32)


def flux_sigmas(num_steps: int, image_seq_len: int, *, dynamic: bool = True, shift: float = 1.0,
                base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                max_shift: float = 1.15) -> np.ndarray:
  """FluxPipeline's schedule: `linspace(1, 1/T, T)` shifted, then 0 appended.

  With `dynamic` (FLUX.1-dev's `use_dynamic_shifting`) the shift depends on the number of image
  tokens: mu is linear in `image_seq_len` through (base_seq_len, base_shift) and (max_seq_len,
  max_shift), and diffusers' exponential time shift `e^mu / (e^mu + 1/s - 1)` equals SD3's
  shift formula with shift = e^mu. Without it, `shift` is used as is (schnell: 1.0).

  Returns:
    float32 numpy [T + 1], from 1 down to 0.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
  if dynamic:
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    shift = float(np.exp(image_seq_len * slope + base_shift - slope * base_seq_len))
  return np.append(shift_sigmas(sigmas, shift), 0.0).astype(np.float32)


def sde_step_mask(num_steps: int, window: tuple[int, int] | None) -> np.ndarray:
  """Which steps are stochastic (and therefore stored and trained).

  Flow-GRPO-Fast and MixGRPO sample only a window of steps with the SDE and the rest with the
  deterministic ODE, which makes training cheaper and credit assignment sharper.

  Args:
    num_steps: T.
    window: `(start, stop)` half-open step range that uses the SDE, or None for all but the last
      step (the last step lands on sigma = 0, where CPS has zero variance and Flow-GRPO's SDE is
      never trained either).

  Returns:
    bool numpy [T].
  """
  if window is None:
    window = (0, num_steps - 1)
  start, stop = window
  if not 0 <= start <= stop <= num_steps:
    raise ValueError(f"sde window {window} must satisfy 0 <= start <= stop <= num_steps={num_steps}")
  mask = np.zeros([num_steps], bool)
  mask[start:stop] = True
  return mask


WINDOW_MODES = ("fixed", "random", "sliding")


def moving_window(iteration: int, *, mode: str, size: int, window_range: tuple[int, int],
                  num_steps: int, seed: int = 0, every: int = 1) -> tuple[int, int]:
  """The SDE window [start, start + size) of a training iteration, for a moving window.

  "random" is Flow-GRPO-Fast's placement: the start is drawn uniformly from the positions that
  fit inside `window_range`, independently for every iteration, from a generator seeded by
  (seed, iteration) so that a resumed run draws the same windows. "sliding" is MixGRPO's: the
  window starts at the range's first step and moves one step later every `every` iterations;
  after the last position it starts again at the first (our choice).

  Args:
    iteration: 0-based training iteration.
    mode: "random" or "sliding".
    size: window length in steps (>= 1).
    window_range: [lo, hi) the window must stay in; (-1, -1) = [0, num_steps - 1).
    num_steps: T.

  Returns:
    (start, stop) with lo <= start and stop = start + size <= hi.
  """
  lo, hi = window_range
  if (lo, hi) == (-1, -1):
    lo, hi = 0, num_steps - 1
  if not 0 <= lo < hi <= num_steps:
    raise ValueError(f"sample.sde_window_range {tuple(window_range)} must satisfy "
                     f"0 <= lo < hi <= num_steps={num_steps}")
  if not 1 <= size <= hi - lo:
    raise ValueError(f"sample.sde_window_size={size} must be in [1, {hi - lo}] for "
                     f"sde_window_range {tuple(window_range)}")
  positions = hi - lo - size + 1
  if mode == "random":
    start = lo + int(np.random.default_rng([seed, iteration]).integers(positions))
  elif mode == "sliding":
    if every < 1:
      raise ValueError(f"sample.sde_window_every must be >= 1, got {every}")
    start = lo + (iteration // every) % positions
  else:
    raise ValueError(f"moving window mode must be 'random' or 'sliding', got {mode!r}")
  return start, start + size


def window_positions(*, size: int, window_range: tuple[int, int],
                     num_steps: int) -> list[tuple[int, int]]:
  """Every window a moving window can take (one compiled sample/train function each)."""
  lo, hi = window_range
  if (lo, hi) == (-1, -1):
    lo, hi = 0, num_steps - 1
  return [(s, s + size) for s in range(lo, hi - size + 1)]


def generator_sigmas(generator, config, num_steps: int) -> np.ndarray:
  """The [T + 1] sigma schedule: the generator's own (FLUX) or SD3's with `sample.shift`."""
  if generator.sigmas is not None:
    return generator.sigmas(num_steps)
  return flow_match_sigmas(num_steps, config.sample.shift)
