"""Runs that survive their users (issue 14): one writer per workdir, logs that match checkpoints
after a kill at any point, checked weights, one-line errors, resume-and-extend, clean sampling and
evaluation, logs without a terminal, prompt files checked before sampling.

Each test states the mistake it replays; subprocesses are used only where an exit status, a
second process or a real kill -9 is the point.
"""

import errno
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from mgrpo_jax import checkpoint as ckpt_lib
from mgrpo_jax import cli
from mgrpo_jax import metrics as metrics_lib
from mgrpo_jax import workdir as workdir_lib
from mgrpo_jax.config_utils import load_sibling
from mgrpo_jax.data import prompts as prompts_lib
from mgrpo_jax.models import weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_ocr_color.py")
DATASETS = os.path.join(os.path.dirname(ROOT), "shared", "datasets")
needs_data = pytest.mark.skipif(not os.path.isdir(DATASETS) and "MGRPO_DATASETS" not in os.environ,
                                reason="../shared/datasets not present")
# The tiny run of the CLI tests: one device, JPEG reward only (no OCR), no progress output.
JPEG = ("--config.reward.names=('jpeg_compressibility',)", "--config.reward.weights=(1.0,)")


def _env(**extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=ROOT)
  env.update(extra)
  return env


def _cli(module, *args, timeout=300, **env):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=_env(**env),
                        capture_output=True, text=True, timeout=timeout)


def tiny(arg="runlocal"):
  return load_sibling(TINY, "tiny_ocr_color").get_config(arg)


# ---- one writer per workdir ------------------------------------------------------------------
def test_second_lock_in_the_same_process_names_the_holder(tmp_path):
  first = workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  with pytest.raises(workdir_lib.WorkdirLocked) as e:
    workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  message = str(e.value)
  assert f"PID {os.getpid()} (this process)" in message and socket.gethostname() in message
  first.release()
  assert (tmp_path / "lock").read_text() == ""  # released: no holder recorded
  with workdir_lib.WorkdirLock(str(tmp_path)) as again:
    assert again.held
    assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()


def _dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_stale_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
  # kill -9 leaves the record but drops the flock: the record is stale.
  stale = {"host": socket.gethostname(), "pid": _dead_pid(), "started": "2026-01-01T00:00:00"}
  (tmp_path / "lock").write_text(json.dumps(stale))
  with caplog.at_level("WARNING"):
    lock = workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  assert f"PID {stale['pid']}" in caplog.text and "stale" in caplog.text
  assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
  lock.release()


def test_without_flock_the_record_decides(tmp_path, monkeypatch):
  def no_flock(fd, op):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(workdir_lib.fcntl, "flock", no_flock)
  record = lambda **kw: (tmp_path / "lock").write_text(json.dumps(kw))
  record(host=socket.gethostname(), pid=os.getppid())  # alive: our parent
  with pytest.raises(workdir_lib.WorkdirLocked, match=f"PID {os.getppid()}"):
    workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  record(host="node-17", pid=4242)  # elsewhere: cannot be checked from here
  with pytest.raises(workdir_lib.WorkdirLocked, match="host node-17, PID 4242.*delete"):
    workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  record(host=socket.gethostname(), pid=_dead_pid())  # gone: stale
  workdir_lib.WorkdirLock(str(tmp_path)).acquire().release()


def test_a_process_lock_is_emptied_on_exit_and_left_stale_by_a_kill(tmp_path):
  script = "import sys; from mgrpo_jax import workdir; workdir.hold_for_process(sys.argv[1])"
  for name, tail, code in (("exit", "; sys.exit(3)", 3),
                           ("kill", "; import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
                            -signal.SIGKILL)):
    res = subprocess.run([sys.executable, "-c", script + tail, str(tmp_path / name)], cwd=ROOT,
                         env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == code, res.stderr[-2000:]
  assert (tmp_path / "exit" / "lock").read_text() == ""
  assert json.loads((tmp_path / "kill" / "lock").read_text())["host"] == socket.gethostname()


_HOLD = textwrap.dedent("""
    import sys, time
    from mgrpo_jax import workdir
    lock = workdir.WorkdirLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(600)
""")


def test_second_train_on_a_held_workdir_exits_at_once_naming_the_holder(tmp_path):
  """Two mgrpo-train on one workdir: the second stops before building anything."""
  holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    start = time.perf_counter()
    res = _cli("mgrpo_jax.train", f"--config={TINY}:runlocal", f"--workdir={tmp_path}", *JPEG,
               timeout=120)
    seconds = time.perf_counter() - start
  finally:
    holder.kill()
    holder.wait()
  assert res.returncode == cli.EXIT_ERROR, res.stderr[-2000:]
  last = res.stderr.strip().splitlines()[-1]
  assert f"PID {holder.pid}" in last and socket.gethostname() in last and "in use" in last
  assert "Traceback" not in res.stderr
  # Nothing of the holder's run was touched: no metrics, no checkpoint directory.
  assert sorted(os.listdir(tmp_path)) == ["lock"]
  assert seconds < 60  # interpreter and imports only; the tiny run takes minutes here


@pytest.mark.slow
def test_multi_host_run_on_a_held_workdir_stops_on_every_process(tmp_path):
  """Two processes of one jax.distributed run: process 0 locks for both, both stop."""
  holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, text=True)
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  try:
    assert holder.stdout.readline().strip() == "locked"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "mgrpo_jax.train", f"--config={TINY}:runlocal",
         f"--workdir={tmp_path}", *JPEG, f"--coordinator_address=localhost:{port}",
         "--num_processes=2", f"--process_id={i}"],
        cwd=ROOT, env=_env(JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for i in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
  finally:
    holder.kill()
    holder.wait()
  assert [p.returncode for p in procs] == [cli.EXIT_ERROR] * 2, errs
  assert f"PID {holder.pid}" in errs[0].strip().splitlines()[-1]
  assert "process 0 could not lock" in errs[1].strip().splitlines()[-1]
  assert sorted(os.listdir(tmp_path)) == ["lock"]


# ---- metrics that match checkpoints ----------------------------------------------------------
def _tb_events(directory):
  """Every Event proto in the TFRecord files of a TensorBoard directory, file by file."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  out = []
  for name in sorted(os.listdir(directory)):
    data, events, i = open(os.path.join(directory, name), "rb").read(), [], 0
    while i < len(data):
      (length,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[i + 12:i + 12 + length])
      events.append(event)
      i += 12 + length + 4  # length, its crc, data, data crc
    out.append(events)
  return out


def test_records_past_the_restored_step_are_dropped(tmp_path):
  """kill -9 after iteration 3 logged, with the last checkpoint at 2: the log must say 1, 2."""
  with metrics_lib.MetricWriter(str(tmp_path)) as writer:
    for step in (1, 2, 3):
      writer.write_scalars(step, {"reward/x": step / 10})
      writer.write_images(step, "eval", np.zeros((1, 4, 4, 3), np.uint8))
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 4, "rew')  # a line cut by the kill
  writer = metrics_lib.MetricWriter(str(tmp_path))
  assert writer.drop_after(2) == 2
  writer.write_scalars(3, {"reward/x": 0.33})  # the rerun iteration
  writer.close()
  assert [(r["step"], r["reward/x"]) for r in metrics_lib.read_metrics(
      str(tmp_path / "metrics.jsonl"))] == [(1, 0.1), (2, 0.2), (3, 0.33)]
  assert sorted(os.listdir(tmp_path / "images")) == ["eval_000001.png", "eval_000002.png"]
  # TensorBoard: the new event file starts with a SessionLog START at step 3, which makes
  # TensorBoard discard the old file's events of steps >= 3.
  files = _tb_events(str(tmp_path / "tb"))
  newest = [e for e in files[-1] if e.HasField("session_log")]
  assert [(e.step, e.session_log.status) for e in newest] == [(3, 1)]  # 1 = START
  assert not os.path.exists(tmp_path / "metrics.jsonl.tmp")


def test_a_run_restarted_without_checkpoint_starts_its_log_afresh(tmp_path):
  with metrics_lib.MetricWriter(str(tmp_path)) as writer:
    writer.write_scalars(0, {"eval/a": 0.5})  # an evaluation before the first iteration
    writer.write_scalars(1, {"a": 1.0})
  with metrics_lib.MetricWriter(str(tmp_path)) as writer:
    assert writer.drop_after(0) == 2
    assert writer.drop_after(0) == 0
  assert metrics_lib.read_metrics(str(tmp_path / "metrics.jsonl")) == []
  disabled = metrics_lib.MetricWriter(str(tmp_path / "other"), enabled=False)
  assert disabled.drop_after(0) == 0 and not os.path.exists(tmp_path / "other")


# ---- checked weights -------------------------------------------------------------------------
def _transformer_file(tmp_path):
  """A 1 MB diffusers-like transformer file: tensors in name order, as save_file lays them."""
  rng = np.random.default_rng(0)
  tensors = {f"transformer_blocks.{i}.attn.to_q.weight": rng.standard_normal((128, 256),
                                                                             np.float32)
             for i in range(8)}
  tensors["proj_out.weight"] = rng.standard_normal((32, 128), np.float32)
  path = tmp_path / "diffusion_pytorch_model.safetensors"
  save_file(tensors, str(path))
  return path


def test_random_bytes_are_named_not_a_memory_error(tmp_path):
  path = _transformer_file(tmp_path)
  size = os.path.getsize(path)
  path.write_bytes(np.random.default_rng(1).bytes(size))
  with pytest.raises(weights.CheckpointError, match="header length field") as e:
    weights.Checkpoint(str(tmp_path))
  assert str(path) in str(e.value)


def test_truncated_file_names_file_and_tensor(tmp_path):
  path = _transformer_file(tmp_path)
  path.write_bytes(path.read_bytes()[:200_000])
  with pytest.raises(weights.CheckpointError) as e:
    weights.Checkpoint(str(tmp_path))
  message = str(e.value)
  # Tensors are laid out in name order: the first cut by the truncation is block 1's.
  assert str(path) in message and "tensor transformer_blocks.1.attn.to_q.weight" in message
  assert "truncated" in message


def _raw_file(path, header, data_size):
  text = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(data_size))


@pytest.mark.parametrize("header, data_size, expected", [
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, 12,
     r"tensor w: F32\[2, 2\] needs 16 bytes but data_offsets \[0, 12\) hold 12"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, 24,
     "tensors a and b overlap"),
    ({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, 8,
     "tensor w has unsupported dtype 'C64'"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, 4,
     r"tensor w has an invalid shape \[-1\]"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}, 8,
     "tensor w has invalid data_offsets"),
    # A gap between tensors: only the safetensors package's own reader objects.
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, 12,
     "not a valid safetensors file"),
])
def test_bad_headers_are_named(tmp_path, header, data_size, expected):
  path = tmp_path / "model.safetensors"
  _raw_file(path, header, data_size)
  with pytest.raises(weights.CheckpointError, match=expected) as e:
    weights.SafetensorsFile(str(path))
  assert str(path) in str(e.value)


def test_corrupt_json_header_and_tiny_file_are_named(tmp_path):
  path = tmp_path / "model.safetensors"
  path.write_bytes(struct.pack("<Q", 5) + b"{oops")
  with pytest.raises(weights.CheckpointError, match="corrupt safetensors header"):
    weights.SafetensorsFile(str(path))
  path.write_bytes(b"abc")
  with pytest.raises(weights.CheckpointError, match="shorter than the 8-byte header length"):
    weights.SafetensorsFile(str(path))


def test_valid_files_still_read_exactly_with_bf16(tmp_path):
  """The checks accept what safetensors writes, bfloat16 included, and the data is unchanged."""
  a = np.arange(6, dtype=np.float32).reshape(2, 3)
  b = (np.arange(4, dtype=np.float32) / 3).astype(ml_dtypes.bfloat16)
  header = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
            "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
            "__metadata__": {"format": "pt"}}
  text = json.dumps(header).encode()
  path = tmp_path / "model.safetensors"
  path.write_bytes(struct.pack("<Q", len(text)) + text + a.tobytes() + b.tobytes())
  f = weights.SafetensorsFile(str(path))
  np.testing.assert_array_equal(f.get("a"), a)
  assert f.get("b").dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(f.get("b").astype(np.float32), b.astype(np.float32))


def test_index_naming_a_tensor_its_shard_lacks_is_named(tmp_path):
  save_file({"a": np.zeros(2, np.float32)}, str(tmp_path / "model-1.safetensors"))
  (tmp_path / "model.safetensors.index.json").write_text(
      json.dumps({"weight_map": {"a": "model-1.safetensors", "b": "model-1.safetensors"}}))
  with pytest.raises(weights.CheckpointError, match="places tensor b in model-1.safetensors"):
    weights.Checkpoint(str(tmp_path))
  (tmp_path / "model.safetensors.index.json").write_text("{not json")
  with pytest.raises(weights.CheckpointError, match="model.safetensors.index.json is not"):
    weights.Checkpoint(str(tmp_path))


# ---- errors as one clean line ----------------------------------------------------------------
def test_misspelt_override_is_one_line_with_a_suggestion(tmp_path):
  res = _cli("mgrpo_jax.train", f"--config={TINY}:runlocal", f"--workdir={tmp_path}/w",
             "--config.train.learing_rate=1e-4", timeout=120)
  assert res.returncode == cli.EXIT_USAGE
  lines = res.stderr.strip().splitlines()
  assert len(lines) == 1, res.stderr
  assert "--config.train.learing_rate" in lines[0] and "did you mean 'learning_rate'" in lines[0]
  assert "\\n" not in lines[0] and not os.path.exists(tmp_path / "w")
  res = _cli("mgrpo_jax.train", f"--config={TINY}:runlocal", f"--workdir={tmp_path}/w",
             "--config.train.learing_rate=1e-4", "--debug", timeout=120)
  assert res.returncode != 0 and "Traceback" in res.stderr


def test_override_messages_name_the_group_and_the_fields():
  config = tiny()
  msg = cli.override_error_message(config, ["--config.trian.beta=0.1"])
  assert msg == "--config.trian.beta: config has no field 'trian'; did you mean 'train'?"
  msg = cli.override_error_message(config, ["--config.train.beta.x=1"])
  assert msg.startswith("--config.train.beta.x: config.train.beta is a float")
  msg = cli.override_error_message(config, ["--config.log.zzz=1"])
  assert "config.log has no field 'zzz'; its fields are" in msg and "eval_every" in msg
  assert cli.override_error_message(config, ["--config.train.beta=0.1", "--workdir=x"]) is None


def test_error_messages_drop_tracebacks_and_name_unexpected_types():
  assert cli.error_message(KeyError("no tensor w")) == "no tensor w"
  assert cli.error_message(ZeroDivisionError("division by zero")) == \
      "ZeroDivisionError: division by zero"
  wrapped = ValueError("flag --config: Traceback (most recent call last):\n  File x\n"
                       "ValueError: unknown variant 'huge'\n")
  assert cli.error_message(wrapped) == "ValueError: unknown variant 'huge'"


# ---- sampling / evaluation of a workdir without checkpoint -----------------------------------
@pytest.mark.parametrize("module, flag", [("mgrpo_jax.evaluate", "--checkpoint"),
                                          ("mgrpo_jax.sample", "--workdir")])
def test_typo_in_the_workdir_is_refused_without_creating_it(tmp_path, module, flag):
  typo = tmp_path / "tinyy"
  res = _cli(module, f"--config={TINY}:runlocal", f"{flag}={typo}", *JPEG, timeout=120)
  assert res.returncode == cli.EXIT_ERROR, res.stderr[-2000:]
  assert f"{typo} holds no checkpoint" in res.stderr and "--init" in res.stderr
  assert "Traceback" not in res.stderr
  assert not typo.exists()


# ---- resume and extend -----------------------------------------------------------------------
def test_finished_run_says_so_and_does_nothing(tmp_path):
  with ckpt_lib.Checkpointer(str(tmp_path), async_save=False) as ckpt:
    ckpt.save(2, {"w": jax.numpy.zeros(2)}, {})
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
  before = sorted(os.listdir(tmp_path))
  res = _cli("mgrpo_jax.train", f"--config={TINY}:runlocal", f"--workdir={tmp_path}", *JPEG,
             "--config.train.num_iterations=2", timeout=120)
  assert res.returncode == 0, res.stderr[-2000:]
  assert "is finished (checkpoint of iteration 2, train.num_iterations=2)" in res.stdout
  assert "done: {}" not in res.stdout
  assert sorted(os.listdir(tmp_path)) == before
  assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'


def test_resume_allows_cadence_and_length_and_names_every_other_change():
  saved = workdir_lib.config_record(tiny())
  extended = tiny()
  extended.train.num_iterations = 40
  extended.log.eval_every, extended.log.keep_checkpoints = 7, 5
  extended.reward.num_workers = 16
  extended.mesh.data = 2
  workdir_lib.check_resume({"config": saved}, extended, "h", 2, "/w")  # allowed: no error

  changed = tiny()
  changed.train.learning_rate = 2e-3
  changed.seed = 3
  changed.train.num_iterations = 40
  with pytest.raises(workdir_lib.ResumeMismatchError) as e:
    workdir_lib.check_resume({"config": saved}, changed, "h", 2, "/w")
  message = str(e.value)
  assert "the checkpoint of iteration 2 in /w" in message
  assert "seed: saved 0, now 3; train.learning_rate: saved 0.001, now 0.002." in message
  assert "num_iterations: saved" not in message

  assert workdir_lib.config_changes({"a": {"b": 1}}, {"a": {"b": 1, "c": [1, 2]}}) == [
      ("a.c", workdir_lib.MISSING, [1, 2])]


def test_checkpoints_from_before_field_metadata_compare_the_hash():
  workdir_lib.check_resume({"config_hash": "abc"}, tiny(), "abc", 4, "/w")
  workdir_lib.check_resume(None, tiny(), "abc", 4, "/w")
  with pytest.raises(workdir_lib.ResumeMismatchError, match="hash abc, now def"):
    workdir_lib.check_resume({"config_hash": "abc"}, tiny(), "def", 4, "/w")


# ---- logs for clusters -----------------------------------------------------------------------
def test_without_a_terminal_each_iteration_is_one_line(monkeypatch):
  clock = iter([100.0, 104.0, 200.0, 201.0])  # bar made at t=100 s, its iteration ends at 104
  monkeypatch.setattr(metrics_lib.time, "perf_counter", lambda: next(clock))
  out = io.StringIO()  # not a TTY, like nohup's or SLURM's log file
  bar = metrics_lib.ProgressBar(total=10, initial=2, enabled=True, file=out)
  metrics = {"reward/ocr": 0.5, "reward/ocr_std": 0.1, "reward/text_color": 0.25,
             "train/kl": 1.5e-5, "train/loss": 3.0, "time/sample": 1.234, "time/reward_wait": 0.5,
             "time/advantages": 0.01, "time/train": 2.0, "time/iteration": 3.8}
  bar.update(1, metrics)
  line = out.getvalue()
  assert line == ("train 3/10 | ocr=0.5 text_color=0.25 | kl=1.50e-05 | sample 1.23s "
                  "reward_wait 0.50s advantages 0.01s train 2.00s | 4.00 s/it, ETA 0:00:28\n")
  silent = io.StringIO()
  bar = metrics_lib.ProgressBar(total=10, enabled=False, file=silent)
  bar.update(1, metrics)
  assert silent.getvalue() == ""


def test_eta_leaves_out_the_first_iteration():
  bar = metrics_lib.ProgressBar(total=10, enabled=False, file=io.StringIO())
  bar._durations = [60.0, 2.0, 4.0]  # pylint: disable=protected-access  (compile, then steady)
  assert bar.seconds_per_iteration() == 3.0


# ---- data checks up front --------------------------------------------------------------------
CSV_HEADER = "line_id,prompt,text,color,source\n"


def test_colour_outside_the_ten_is_caught_when_the_file_is_read(tmp_path):
  path = tmp_path / "prompts.csv"
  path.write_text(CSV_HEADER + '1,"a sign that says ""HI""",HI,red,x\n'
                  '2,"a sign that says ""YO""",YO,teal,x\n')
  with pytest.raises(prompts_lib.PromptFileError) as e:
    prompts_lib.load_prompts(str(path))
  assert str(e.value).startswith(f"{path}:3: colour 'teal' is not one of the ten")
  assert "red, orange, yellow" in str(e.value)
  path.write_text(CSV_HEADER + "1,a sign,!!!,Red,x\n")
  with pytest.raises(prompts_lib.PromptFileError, match=r":2: text '!!!' has no letter"):
    prompts_lib.load_prompts(str(path))


def test_prompt_lines_lacking_what_the_rewards_read_are_refused(tmp_path):
  path = tmp_path / "prompts.txt"
  path.write_text('a sign that reads "OPEN"\n\na cat on a mat\n')
  assert len(prompts_lib.load_prompts(str(path))) == 2  # no reward named: nothing to check
  prompts_lib.load_prompts(str(path), reward_names=("jpeg_compressibility",))
  with pytest.raises(prompts_lib.PromptFileError, match=r"prompts.txt:3: the ocr reward cannot"):
    prompts_lib.load_prompts(str(path), reward_names=("ocr",))
  with pytest.raises(prompts_lib.PromptFileError,
                     match=r"prompts.txt:1: the text_color reward needs a colour"):
    prompts_lib.load_prompts(str(path), reward_names=("text_color",))


def test_trainer_checks_prompts_before_building_the_model(tmp_path):
  from mgrpo_jax import trainer as trainer_lib  # pylint: disable=import-outside-toplevel
  path = tmp_path / "prompts.txt"
  path.write_text('a sign that reads "OPEN"\n')
  config = tiny()
  config.data.dataset = str(path)
  config.mesh.data, config.mesh.tensor = 4, 2
  with pytest.raises(prompts_lib.PromptFileError, match="text_color reward needs a colour"):
    trainer_lib.Trainer(config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "lock")


# ---- no torch warning from the tokenizers --------------------------------------------------------
def test_tokenizer_loading_without_torch_prints_no_torch_advice(tmp_path):
  script = textwrap.dedent(f"""
      import sys, types
      sys.modules["torch"] = None  # as if torch were not installed
      from mgrpo_jax.models import sd3
      settings = types.SimpleNamespace(path={str(tmp_path)!r}, use_t5=False,
                                       max_sequence_length=8)
      try:
        sd3.SD3Tokenizer(settings)
      except Exception as e:  # no tokenizer files here; the import is what matters
        print(type(e).__name__)
  """)
  res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=120)
  assert res.returncode == 0, res.stderr[-2000:]
  assert res.stdout.strip()  # it got as far as loading a tokenizer
  assert "PyTorch was not found" not in res.stderr


# ---- kill -9 at every point of an iteration, then resume and extend ------------------------------
# Runs mgrpo-train in this process after arranging a SIGKILL at one point of one iteration.
_KILL = textwrap.dedent("""
    import os, signal, sys
    from mgrpo_jax import checkpoint, metrics, train
    point, at = sys.argv[1], int(sys.argv[2])

    def die():
      os.kill(os.getpid(), signal.SIGKILL)

    def around(cls, name, before=False, after=False):
      original = getattr(cls, name)
      def patched(self, step, *args, **kwargs):
        if before and step == at:
          die()
        out = original(self, step, *args, **kwargs)
        if after and step == at:
          die()
        return out
      setattr(cls, name, patched)

    if point == "before_metrics":
      around(metrics.MetricWriter, "write_scalars", before=True)
    elif point == "after_metrics":
      around(metrics.MetricWriter, "write_scalars", after=True)
    elif point == "eval":  # the grid is rendered, not yet written
      around(metrics.MetricWriter, "write_images", before=True)
    elif point == "checkpoint":  # the save has started writing in the background
      around(checkpoint.Checkpointer, "save", after=True)
    sys.argv = ["mgrpo-train"] + sys.argv[3:]
    train.run()
""")


@needs_data
@pytest.mark.slow
def test_kill_at_every_point_then_resume_and_extend(tmp_path):
  cache = str(tmp_path / "jax_cache")  # later runs reuse the first one's compilations
  env = _env(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  flags = (f"--config={TINY}:runlocal", *JPEG, "--config.log.num_eval_prompts=2")

  def train(workdir, iterations, point="none", at=0):
    return subprocess.run(
        [sys.executable, "-c", _KILL, point, str(at), f"--workdir={workdir}", *flags,
         f"--config.train.num_iterations={iterations}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)

  def steps(workdir):
    return [r["step"] for r in metrics_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"))]

  straight = str(tmp_path / "straight")
  res = train(straight, 4)
  assert res.returncode == 0, res.stderr[-3000:]
  # No terminal: one line per iteration with rewards, phases and an ETA.
  lines = [l for l in res.stderr.splitlines() if l.startswith("train ")]
  assert [l.split(" | ")[0] for l in lines] == [f"train {i}/4" for i in range(1, 5)]
  assert "jpeg_compressibility=" in lines[-1] and "s/it, ETA 0:00:00" in lines[-1]

  run = str(tmp_path / "killed")
  chain = [  # (kill point, iteration, committed checkpoints after the kill)
      ("after_metrics", 1, []),     # logged 1, never checkpointed
      ("checkpoint", 1, []),        # killed while checkpoint 1 was being written
      ("eval", 2, [1]),             # logged 2, killed rendering its grid
      ("before_metrics", 3, [1, 2]),
  ]
  for point, at, committed in chain:
    res = train(run, 3, point, at)
    assert res.returncode == -signal.SIGKILL, (point, res.stderr[-3000:])
    assert ckpt_lib.committed_steps(run) == committed, point
  res = train(run, 3)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "taking over a stale lock" in res.stderr  # the kill -9 before it left its record
  assert steps(run) == [1, 2, 3]

  # Rerunning the finished run does nothing; raising num_iterations extends it.
  res = train(run, 3)
  assert res.returncode == 0 and "is finished" in res.stdout
  res = train(run, 4)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "resuming from the checkpoint of iteration 3" in res.stderr
  assert steps(run) == [1, 2, 3, 4]
  assert "stale" not in res.stderr and open(os.path.join(run, "lock")).read() == ""
  step_a, a = ckpt_lib.load_numpy(straight)
  step_b, b = ckpt_lib.load_numpy(run)
  assert step_a == step_b == 4
  for x, y in zip(jax.tree.leaves(a["trainable"]), jax.tree.leaves(b["trainable"])):
    np.testing.assert_array_equal(x, y)

  # Sampling and evaluating the result: the output only, no orbax INFO and no "resuming".
  for module, args in (("mgrpo_jax.sample", [f"--workdir={run}", "--prompt=a red sign"]),
                       ("mgrpo_jax.evaluate", [f"--checkpoint={run}", "--num_prompts=2"])):
    res = subprocess.run([sys.executable, "-m", module, *flags, *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "iteration 4" in res.stdout
    assert not [l for l in res.stderr.splitlines() if l.startswith("I") or "resuming" in l], \
        res.stderr[-3000:]
