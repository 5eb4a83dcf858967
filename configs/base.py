r"""Base configuration of a Multi-GRPO run; every experiment config derives from it.

Not meant to be run by itself (it has no dataset-specific choices beyond defaults); see
configs/tiny_ocr_color.py for a runnable default:

  mgrpo-train --config configs/tiny_ocr_color.py --workdir /tmp/mgrpo_tiny

Any field can be overridden on the command line, e.g. `--config.train.learning_rate=1e-4`;
the config is locked, so a misspelt field is an error.
"""

import ml_collections

from mgrpo_jax.models import registry


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  # Base seed: parameters, sampling noise and data order all derive from it.
  config.seed = 0

  # ---- generator ---------------------------------------------------------------------------
  # Generator by registry name with its fields (see mgrpo_jax/models/registry.py).
  config.model = registry.default_tiny_model_config()
  config.lora = ml_collections.ConfigDict()
  # Train LoRA adapters (True) or every parameter (False, keeps a frozen reference copy).
  config.lora.enabled = True
  # Adapter rank and scale alpha (output scaled by alpha / rank).
  config.lora.rank = 8
  config.lora.alpha = 16.0
  # Regexes over dotted module paths; Flow-GRPO adapts the q/k/v/out projections of both streams.
  config.lora.targets = (r"attn\.(to_q|to_k|to_v|to_out|add_q_proj|add_k_proj|add_v_proj|to_add_out)$",)
  # Start the adapters from a diffusers/PEFT LoRA (.safetensors file or its directory; "" = none).
  config.lora.init_from = ""

  # ---- data ----------------------------------------------------------------------------------
  config.data = ml_collections.ConfigDict()
  # A dataset name (`ocr_color_10`, `pickscore_25k`, resolved in $MGRPO_DATASETS or
  # ../shared/datasets), a path to a .csv / .txt prompt file, or `tfds:<name>` (a TFDS copy
  # prepared by `python -m mgrpo_jax.data.tfds_builders --name <name>`).
  config.data.dataset = "ocr_color_10"
  # TFDS data dir of a `tfds:` dataset ("" = $TFDS_DATA_DIR, else ~/tensorflow_datasets).
  config.data.tfds_data_dir = ""
  # Split of a named or `tfds:` dataset.
  config.data.split = "test"
  # Prompts per sampling batch, over all devices and hosts (P).
  config.data.prompts_per_batch = 4
  # Shuffle prompts each epoch (seeded).
  config.data.shuffle = True

  # ---- sampling ------------------------------------------------------------------------------
  config.sample = ml_collections.ConfigDict()
  # Denoising steps T for training rollouts.
  config.sample.num_steps = 10
  # Denoising steps for evaluation images (ODE).
  config.sample.eval_num_steps = 10
  # SD3 timestep shift of the schedule.
  config.sample.shift = 3.0
  # Stochastic step: "sde" (Flow-GRPO) or "cps" (coefficients-preserving).
  config.sample.method = "sde"
  # SDE noise level a (CPS eta).
  config.sample.noise_level = 0.7
  # CPS transition score: "flow_grpo" (-mean sq. error) or "exact" (Gaussian log-density).
  config.sample.cps_logprob = "flow_grpo"
  # Steps [start, stop) sampled with the SDE and trained; (-1, -1) = all but the last step.
  config.sample.sde_window = (-1, -1)
  # Moving SDE window: "fixed" (sde_window), "random" (Flow-GRPO-Fast: drawn per iteration) or
  # "sliding" (MixGRPO: one step later every sde_window_every iterations, wrapping around).
  config.sample.sde_window_mode = "fixed"
  # Moving window: its length in steps and the [start, stop) range it stays in ((-1, -1) = all
  # but the last step); one compiled sample/train function per position.
  config.sample.sde_window_size = 3
  config.sample.sde_window_range = (-1, -1)
  config.sample.sde_window_every = 1
  # Classifier-free guidance scale (1.0 disables CFG).
  config.sample.guidance_scale = 4.5
  # Negative prompt for CFG.
  config.sample.negative_prompt = ""
  # Sampling batches per iteration; host rewards of one batch overlap sampling of the next.
  config.sample.batches_per_iteration = 2
  # A prompt's roots share one initial noise.
  config.sample.same_latent = False
  # Keep the text conditioning of up to this many prompts on the host so repeated prompts (and
  # the negative prompt) skip the text encoders; 0 = encode every batch. Needs frozen encoders.
  config.sample.text_cache_size = 0

  # ---- rollout tree --------------------------------------------------------------------------
  config.tree = ml_collections.ConfigDict()
  # "tree" (Multi-GRPO) or "flat" (Flow-GRPO: group_size independent trajectories per prompt).
  config.tree.mode = "tree"
  # flat: images per prompt (G).
  config.tree.group_size = 4
  # tree: initial noises per prompt.
  config.tree.num_roots = 1
  # tree: increasing step indices where every live node branches.
  config.tree.branch_steps = (0, 2)
  # tree: copies per node at each branch step (leaves = num_roots * prod).
  config.tree.branch_factors = (2, 2)

  # ---- rewards and advantages ----------------------------------------------------------------
  config.reward = ml_collections.ConfigDict()
  # Reward names (mgrpo_jax/rewards registry) and their weights in the combined advantage.
  config.reward.names = ("ocr", "text_color")
  config.reward.weights = (1.0, 1.0)
  # Host threads or processes for reward computation (0 = one per CPU core).
  config.reward.num_workers = 4
  # Host reward pool: "thread" or "process". Processes scale OCR to many cores (its
  # pre/post-processing holds the GIL); threads start instantly, and on a small host whose
  # cores also do the sampling (the CPU tiny job) processes have no spare cores to use.
  config.reward.pool = "thread"
  # Local directories of the on-device reward models (transformers CLIPModel layout with
  # tokenizer files; nothing is downloaded): PickScore_v1 for `pickscore`, CLIP ViT-L/14 for
  # `clipscore` and `aesthetic`, and the converted aesthetic head (safetensors) for `aesthetic`.
  config.reward.pickscore_path = ""
  config.reward.clip_path = ""
  config.reward.aesthetic_path = ""

  config.advantage = ml_collections.ConfigDict()
  # "reward_groups" (normalise per reward, then combine) or "reward_mixing" (baseline).
  config.advantage.mode = "reward_groups"
  # Temporal group scope: "level" (nodes of a step, per prompt), "siblings", "leaf" (off).
  config.advantage.scope = "level"
  # Std for normalisation: "group" (each temporal group's own std, as the paper draws it),
  # "global" (per tree level over the whole batch, Flow-GRPO's global_std), or "auto" = "group"
  # in tree mode and "global" in flat mode.
  config.advantage.std = "auto"
  # Added to the std.
  config.advantage.eps = 1e-4
  # Advantages are clipped to [-clip, clip].
  config.advantage.clip = 5.0
  # Zero loss weight for groups whose advantages are all zero.
  config.advantage.drop_zero_groups = False
  # BranchGRPO's pruning (only loss weights change; sampling is untouched). Branchings (a
  # parent's children, or a prompt's roots) whose values spread by less than this, max - min in
  # reward units for every reward, are not trained (0 = off). A lone root always is such one.
  config.advantage.prune_spread = 0.0
  # Tree levels whose transitions are trained, e.g. (1, 2); () = all. Level 0 = the roots'
  # steps, level j = the steps from tree.branch_steps[j-1] to the next branch step.
  config.advantage.train_levels = ()
  # Normalise leaf rewards with each prompt's reward history over the whole run. Not Flow-GRPO's
  # stat tracker, which is cleared every epoch (= the default per-prompt leaf groups).
  config.advantage.per_prompt_history = False

  # ---- optimisation --------------------------------------------------------------------------
  config.train = ml_collections.ConfigDict()
  # Training iterations (sample -> reward -> advantages -> inner epochs).
  config.train.num_iterations = 4
  # PPO inner epochs over the iteration's transitions.
  config.train.inner_epochs = 1
  # Minibatches per inner epoch and sampling batch (each prompt's transitions are split into
  # parts that differ by at most one; padding rows carry no weight).
  config.train.num_minibatches = 2
  # Minibatches whose gradients are accumulated into one optimizer update; must divide the
  # minibatches of an iteration (batches_per_iteration x num_minibatches x inner_epochs).
  config.train.grad_accum_steps = 1
  # AdamW.
  config.train.learning_rate = 3e-4
  config.train.weight_decay = 1e-4
  config.train.b1 = 0.9
  config.train.b2 = 0.999
  config.train.adam_eps = 1e-8
  # Global gradient-norm clip.
  config.train.max_grad_norm = 1.0
  # PPO clip range.
  config.train.clip_range = 1e-4
  # KL weight to the reference policy (adapters disabled).
  config.train.beta = 0.04
  # KL divisor: "flow_grpo" (std before sqrt(-dt)) or "exact" (transition variance).
  config.train.kl_mode = "flow_grpo"
  # GRPO-Guard RatioNorm: centre each step's log-ratio and scale it by the transition std.
  config.train.ratio_norm = False
  # GRPO-Guard step reweighting of each step's policy loss: "none" or "inv_dt" (times 1 / -dt).
  config.train.step_reweight = "none"
  # EMA of the trained weights used for evaluation images (0 = off), updated every ema_every
  # optimizer steps.
  config.train.ema_decay = 0.0
  config.train.ema_every = 1
  # Flow-GRPO's EMA warm-up: decay min((1 + u) / (10 + u), ema_decay) after u optimizer updates.
  config.train.ema_warmup = False

  # ---- devices -------------------------------------------------------------------------------
  config.mesh = ml_collections.ConfigDict()
  # Mesh axis sizes; -1 takes the remaining devices.
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.tensor = 1

  # ---- logging, evaluation and checkpoints ---------------------------------------------------
  config.log = ml_collections.ConfigDict()
  # Evaluate every this many iterations (and at the end): a grid of ODE samples of fixed
  # prompts with fixed noise, and the mean of every reward on them, logged as eval/<reward>.
  config.log.eval_every = 2
  # Also evaluate before the first iteration of a fresh run (logged as step 0): the baseline.
  config.log.eval_at_start = False
  # Evaluation prompts: the first num_eval_prompts of this dataset name or prompt file ("" =
  # the training prompts) and split ("" = data.split), e.g. "ocr_color_10" and "test".
  config.log.eval_dataset = ""
  config.log.eval_split = ""
  config.log.num_eval_prompts = 4
  # Save a checkpoint every this many iterations (and at the end).
  config.log.checkpoint_every = 1
  # Checkpoints kept.
  config.log.keep_checkpoints = 2
  # Show a progress bar.
  config.log.progress = True
  # Capture a jax.profiler trace of this iteration into WORKDIR/profile (-1: never).
  config.log.profile_iteration = -1
  # Also log to this Weights & Biases project ("" = off; needs `pip install -e ".[wandb]"`).
  config.log.wandb_project = ""
  return config
