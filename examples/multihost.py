"""Train with layerwise on several hosts (jax.distributed), here as local processes.

Each process of a multi-host run executes the same program: it calls
``jax.distributed.initialize``, builds one global mesh over every process's
devices, places the params and the optimizer state on it (the state with
``lw.state_shardings``), and runs the same jitted train step on its part of
the batch. This script plays N hosts on one machine: it launches itself N
times on the CPU (2 devices each, 1 on jax < 0.5; gloo collectives; a
coordinator on 127.0.0.1 at a free port), and each copy trains a small FSDP
model with a layerwise chain (per-layer clipping, a frozen embedding, AdamW,
per-layer rates). Process 0 logs the loss and ``lw.norms``; a new rate set with
``lw.set_scale`` halfway is the same on every process, as it must be.

Run:  python examples/multihost.py [--processes N] [--steps S] [--devices D]

``launch`` (start N processes, wait with a timeout, end them all if one
fails) and ``initialize`` (``jax.distributed.initialize`` from what
``launch`` set) are what tests/test_multihost.py uses too.
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import subprocess
import sys
import tempfile
import time

#: Where ``launch`` tells each process how to join the run.
COORDINATOR, PROCESSES, PROCESS_ID = ("LW_COORDINATOR", "LW_PROCESSES",
                                      "LW_PROCESS_ID")


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(argv: list[str], processes: int = 2, devices: int = 2,
           timeout: float = 120.0) -> list[str]:
  """Runs ``python *argv`` as the ``processes`` processes of one
  ``jax.distributed`` run on the CPU, ``devices`` CPU devices each.

  Returns each process's output (stdout and stderr), in process order.
  Raises ``RuntimeError`` with the outputs if a process fails or the run
  takes more than ``timeout`` seconds; either way, every process started
  here is ended before it returns.
  """
  port = free_port()
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(
      flags + [f"--xla_force_host_platform_device_count={devices}"]))
  env.update({COORDINATOR: f"127.0.0.1:{port}", PROCESSES: str(processes)})
  logs = [tempfile.TemporaryFile(mode="w+") for _ in range(processes)]
  started: list[subprocess.Popen[str]] = []
  try:
    for i, log in enumerate(logs):
      started.append(subprocess.Popen(
          [sys.executable, *argv], env=dict(env, **{PROCESS_ID: str(i)}),
          stdout=log, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in started):
      failed = any(p.poll() not in (None, 0) for p in started)
      if failed or time.monotonic() > deadline:
        break
      time.sleep(0.05)
  finally:
    for p in started:
      if p.poll() is None:
        p.kill()
    for p in started:
      p.wait()
    outputs = []
    for log in logs:
      log.seek(0)
      outputs.append(log.read())
      log.close()
  codes = [p.returncode for p in started]
  if any(codes):
    shown = "\n".join(f"--- process {i} (exit {c}):\n{out[-3000:]}"
                      for i, (c, out) in enumerate(zip(codes, outputs)))
    raise RuntimeError(f"{argv}: the run failed or took more than "
                       f"{timeout:g} s (killed: exit -9)\n{shown}")
  return outputs


def default_devices() -> int:
  """CPU devices per process: 2, or 1 on jax < 0.5, whose gloo cannot
  build its context for several CPU devices in one process (jax 0.4.30:
  GetKeyValue() times out)."""
  import jax  # pylint: disable=g-import-not-at-top
  return 2 if jax.__version_info__ >= (0, 5) else 1


def initialize() -> None:
  """``jax.distributed.initialize`` for a process ``launch`` started (CPU
  collectives by gloo); nothing for a run of one process."""
  import jax  # pylint: disable=g-import-not-at-top
  processes = int(os.environ.get(PROCESSES, "1"))
  if processes == 1:
    return
  try:  # jax < 0.5 chooses the CPU collectives; gloo is the default later
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except AttributeError:
    pass
  jax.distributed.initialize(coordinator_address=os.environ[COORDINATOR],
                             num_processes=processes,
                             process_id=int(os.environ[PROCESS_ID]))


def problem(steps: int, batch: int) -> tuple[dict, object, object]:
  """The model's initial params and the data (inputs, targets per step), as
  NumPy arrays: the same on every process (one seed)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  host_params = {
      "embed": {"w": rng.normal(size=(8, 16)).astype(np.float32) / 3},
      "encoder": {"w": rng.normal(size=(16, 32)).astype(np.float32) / 4,
                  "b": np.zeros(32, np.float32)},
      "head": {"w": rng.normal(size=(32, 4)).astype(np.float32) / 6}}
  xs = rng.normal(size=(steps, batch, 8)).astype(np.float32)
  ys = np.tanh(xs @ rng.normal(size=(8, 4))).astype(np.float32)
  return host_params, xs, ys


def placement(mesh):
  """``(fsdp, put)`` on ``mesh``: ``fsdp(shape)``, the sharding that splits
  an array's first axis over the mesh where it divides (else replicates
  it); ``put(host, sharding)``, a global array of a host array, each
  process making its own shards."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  def fsdp(shape):
    return NamedSharding(mesh, P("data") if shape and shape[0] % mesh.size == 0
                         else P())

  def put(host, sharding):
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding,
                                        lambda index: host[index])

  return fsdp, put


def train(steps: int) -> None:
  """One process's part of the run."""
  initialize()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  import layerwise as lw

  mesh = Mesh(np.array(jax.devices()), ("data",))  # every process's devices
  n = mesh.size

  fsdp, put = placement(mesh)
  host_params, xs, ys = problem(steps, 8 * n)
  params = jax.tree_util.tree_map(lambda x: put(x, fsdp(x.shape)),
                                  host_params)

  tx = optax.chain(
      lw.clip_by_rules({"encoder/**": lw.clip_group_norm(1.0),
                        "**": lw.clip_norm(0.5)}),
      lw.freeze(optax.adamw(1e-2, weight_decay=1e-4), "embed/**"),
      lw.scale_by_rules({"encoder/**": 0.5, "**": 1.0}))
  # Each moment sharded like its parameter, layerwise's vectors and the
  # counts replicated: made where they belong, on every process.
  state_shardings = lw.state_shardings(tx, params)
  state = jax.jit(tx.init, out_shardings=state_shardings)(params)

  def loss_fn(p, x, y):
    h = jnp.tanh(jnp.tanh(x @ p["embed"]["w"]) @ p["encoder"]["w"]
                 + p["encoder"]["b"])
    return jnp.mean((h @ p["head"]["w"] - y) ** 2)

  param_shardings = jax.tree_util.tree_map(lambda x: x.sharding, params)

  @functools.partial(jax.jit, out_shardings=(param_shardings,
                                             state_shardings, None))
  def train_step(p, s, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
    updates, s = tx.update(grads, s, p)
    # The norms as metrics: scalars, replicated, readable on any process.
    return optax.apply_updates(p, updates), s, {"loss": loss,
                                                **lw.norms(s)}

  batch = NamedSharding(mesh, P("data"))
  for t in range(steps):
    if t == steps // 2:  # the same value on every process (else an error)
      state = lw.set_scale(state, "encoder/**", 0.1)
    params, state, metrics = train_step(params, state, put(xs[t], batch),
                                        put(ys[t], batch))
    if jax.process_index() == 0:
      print(f"step {t}: loss {float(metrics['loss']):.4f}, encoder norm "
            f"{float(metrics['clip/encoder/**/norm']):.3f}, head/w scale "
            f"{float(metrics['clip/head/w/scale']):.3f}", flush=True)
  table = lw.describe(tx, params, opt_state=state)  # on every process
  if jax.process_index() == 0:
    print(f"\n{jax.process_count()} processes, {n} devices\n\n{table}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--devices", type=int, default=None,
                      help="CPU devices per process (default: 2; 1 on "
                      "jax < 0.5)")
  parser.add_argument("--timeout", type=float, default=300.0)
  args = parser.parse_args()
  if PROCESS_ID in os.environ:  # a process launch started
    train(args.steps)
    return
  outputs = launch([os.path.abspath(__file__), "--steps", str(args.steps)],
                   processes=args.processes,
                   devices=args.devices or default_devices(),
                   timeout=args.timeout)
  print("".join(line + "\n" for line in outputs[0].splitlines()
                if not line.startswith(("[Gloo]", "WARNING", "I0000",
                                        "E0000"))), end="")


if __name__ == "__main__":
  main()
