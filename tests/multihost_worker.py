"""One process of the runs tests/test_multihost.py launches; not a test.

``--mode two``: a process of a 2-process ``jax.distributed`` run (started by
``launch`` of examples/multihost.py). It trains a small FSDP model 6 steps
with a layerwise chain, its state placed by ``lw.state_shardings``, saving a
checkpoint after 3 steps, and checks everything the test asserts on: the
placement, a resume from the checkpoint, ``lw.norms`` / ``lw.describe`` on a
state whose vectors a shape-based placement splits across the processes,
the collectives of the compiled update, and the setters' check that a value
is the same on every process. ``--mode one``: the same training in one
process (other devices: another topology), and a resume of the
2-process checkpoint. Each process writes what it found to
``<out>/<mode>_<process>.json``; every check is recorded, never raised, so
that the test shows what failed.

The checkpoint is written with orbax-checkpoint when it is installed. Else
each array is gathered to every process
(``jax.experimental.multihost_utils.process_allgather``) and process 0
saves them with NumPy: simple, but every process holds the whole state
once, so it suits small states only (``LW_NO_ORBAX=1`` uses it with orbax
installed, to check it).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys
import traceback

# This checkout's layerwise, and the launcher's initialize.
_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(_ROOT), str(_ROOT / "examples")]
import multihost  # noqa: E402  # the launcher, the model and the data

STEPS, SAVED_AT, BATCH = 6, 3, 16
COLLECTIVE = re.compile(
    r"=\s*(\([^)]*\)|\S+)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|"
    r"collective-permute|collective-broadcast)(?:-start)?\(")


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--mode", choices=["two", "one"], required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--checkpoint", required=True)
  args = parser.parse_args()
  multihost.initialize()

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.experimental import multihost_utils
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  import layerwise as lw

  try:  # LW_NO_ORBAX=1: the NumPy checkpoint even with orbax installed
    import orbax.checkpoint as ocp
  except ImportError:
    ocp = None
  if os.environ.get("LW_NO_ORBAX"):
    ocp = None

  results: dict = {"process": jax.process_index(),
                   "processes": jax.process_count(),
                   "devices": jax.device_count(), "orbax": ocp is not None}

  def record(key, fn):
    try:
      results[key] = fn()
    except BaseException as e:  # pylint: disable=broad-except
      results[key] = {"error": f"{type(e).__name__}: {e}",
                      "traceback": traceback.format_exc()[-2000:]}

  mesh = Mesh(np.array(jax.devices()), ("data",))
  replicated = NamedSharding(mesh, P())

  fsdp, put = multihost.placement(mesh)  # the example's

  def fetch(tree):  # every process gets the whole values
    return jax.tree_util.tree_map(
        lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)
                             if not x.is_fully_addressable else x), tree)

  def listed(tree):
    return {p: np.asarray(x).tolist() for p, x in zip(
        jax.tree_util.tree_leaves(lw.paths(tree)),
        jax.tree_util.tree_leaves(tree))}

  host_params, xs, ys = multihost.problem(STEPS, BATCH)  # the example's
  params0 = jax.tree_util.tree_map(lambda x: put(x, fsdp(x.shape)),
                                   host_params)
  param_shardings = jax.tree_util.tree_map(lambda x: x.sharding, params0)
  batch = NamedSharding(mesh, P("data"))

  # Four clip groups (one per leaf), four multipliers: vectors a
  # shape-based placement splits over 2 or 4 devices.
  tx = optax.chain(
      lw.clip_by_rules({"encoder/w": lw.clip_norm(1.0),
                        "**": lw.clip_norm(0.5)}),
      lw.freeze(optax.adamw(1e-2, weight_decay=1e-4), "embed/**"),
      lw.scale_by_rules({"encoder/**": 0.5, "**": 1.0}))
  shardings = lw.state_shardings(tx, params0)
  state0 = jax.jit(tx.init, out_shardings=shardings)(params0)

  def placed_right():
    wrong = []
    for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(state0),
                            jax.tree_util.tree_leaves(shardings)):
      if not x.sharding.is_equivalent_to(s, x.ndim):
        wrong.append(jax.tree_util.keystr(path))
    moments = jax.tree_util.tree_leaves(state0[1].inner_state[0].mu)
    return {"wrong": wrong, "moment_specs": [
        str(m.sharding.spec) for m in moments]}

  record("init_placement", placed_right)

  def loss_fn(p, x, y):
    h = jnp.tanh(jnp.tanh(x @ p["embed"]["w"]) @ p["encoder"]["w"]
                 + p["encoder"]["b"])
    return jnp.mean((h @ p["head"]["w"] - y) ** 2)

  def make_step(state_shardings):
    def train_step(p, s, x, y):
      loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
      updates, s = tx.update(grads, s, p)
      return (optax.apply_updates(p, updates), s,
              {"loss": loss, **lw.norms(s)}, updates)
    return jax.jit(train_step, out_shardings=(
        param_shardings, state_shardings, replicated, param_shardings))

  step = make_step(shardings)

  def run(p, s, steps, on_step=None):
    metrics, first_updates = [], None
    for t in steps:
      p, s, m, u = step(p, s, put(xs[t], batch), put(ys[t], batch))
      metrics.append({k: float(v) for k, v in m.items()})
      if first_updates is None:
        first_updates = u
      if on_step is not None:
        on_step(t, p, s)
    return p, s, metrics, first_updates

  checkpoint = os.path.join(args.checkpoint, "step3")
  abstract = jax.eval_shape(lambda: {"params": params0, "opt_state": state0})
  target = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, {"params": param_shardings, "opt_state": shardings})

  def save(p, s):
    tree = {"params": p, "opt_state": s}
    if ocp is not None:
      checkpointer = ocp.StandardCheckpointer()
      checkpointer.save(checkpoint, tree)
      checkpointer.wait_until_finished()
      return
    leaves = fetch(tree)  # a collective: every process gathers
    if jax.process_index() == 0:
      os.makedirs(checkpoint, exist_ok=True)
      np.savez(os.path.join(checkpoint, "state.npz"),
               **{str(i): x for i, x in
                  enumerate(jax.tree_util.tree_leaves(leaves))})
    multihost_utils.sync_global_devices("saved")

  def restore():
    if ocp is not None:
      return ocp.StandardCheckpointer().restore(checkpoint, target)
    with np.load(os.path.join(checkpoint, "state.npz")) as saved:
      leaves, treedef = jax.tree_util.tree_flatten(target)
      return treedef.unflatten([put(saved[str(i)], t.sharding)
                                for i, t in enumerate(leaves)])

  if args.mode == "two":
    def on_step(t, p, s):
      if t == SAVED_AT - 1:
        save(p, s)
    params, state, metrics, first = run(params0, state0, range(STEPS),
                                        on_step)
    final = fetch(params)
    results.update(final=listed(final), first_updates=listed(fetch(first)),
                   metrics=metrics)

    def resumed_same_topology():
      restored = restore()
      p, _, m, _ = run(restored["params"], restored["opt_state"],
                       range(SAVED_AT, STEPS))
      got = fetch(p)
      return {"bitwise_equal": all(
          np.array_equal(a, b) for a, b in zip(
              jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(final))),
              "metrics_equal": m == metrics[SAVED_AT:]}

    record("resume_two", resumed_same_topology)

    # The state placed by shape (the first axis split where it divides, as
    # a generic FSDP rule does to every leaf of eval_shape's state): the
    # clip statistics and the multipliers are split across the processes.
    by_shape = jax.tree_util.tree_map(
        lambda s: fsdp(s.shape), jax.eval_shape(tx.init, params0))
    state_b = jax.jit(tx.init, out_shardings=by_shape)(params0)
    _, state_b, _, _ = make_step(by_shape)(
        params0, state_b, put(xs[0], batch), put(ys[0], batch))

    def eager_update():  # outside jit, the multipliers are read eagerly
      grads = jax.grad(loss_fn)(params0, put(xs[1], batch), put(ys[1], batch))
      eager, _ = tx.update(grads, state_b, params0)
      jitted, _ = jax.jit(tx.update)(grads, state_b, params0)
      return max(float(np.max(np.abs(a - b))) for a, b in zip(
          jax.tree_util.tree_leaves(fetch(eager)),
          jax.tree_util.tree_leaves(fetch(jitted))))

    record("eager_update", eager_update)
    results["split_vectors"] = [
        not v.is_fully_addressable for v in (state_b[0].norms,
                                             state_b[2].multipliers)]
    record("norms_float",
           lambda: {k: float(v) for k, v in lw.norms(state_b).items()})
    record("norms_device_get", lambda: {
        k: float(v) for k, v in jax.device_get(lw.norms(state_b)).items()})
    record("hyperparams", lambda: {
        k: float(v) for k, v in lw.hyperparams(state_b).items()})

    def described():
      d = lw.describe(tx, params0, opt_state=lw.set_scale(
          state_b, "head/**", 0.25))
      return {r["path"]: [r["clip_norm"], r["scale"]] for r in d.rows}

    record("describe", described)

    hlo = jax.jit(tx.update).lower(
        jax.tree_util.tree_map(lambda p: put(np.ones(p.shape, np.float32),
                                             p.sharding), params0),
        state0, params0).compile().as_text()
    results["collectives"] = [[op, shape]
                              for shape, op in COLLECTIVE.findall(hlo)]

    def setter(fn, *rest):
      try:
        fn(state0, *rest, 0.5 + jax.process_index())
      except ValueError as e:
        return str(e)
      return None

    results["set_scale_mismatch"] = setter(lw.set_scale, "head/**")
    results["set_threshold_mismatch"] = setter(lw.set_threshold, "head/**")

    def same_value():
      s = lw.set_scale(state0, "head/**", 0.25)
      vector = s[2].multipliers
      return {"value": float(lw.hyperparams(s)["scale/head/w"]),
              "placed": vector.sharding.is_equivalent_to(
                  state0[2].multipliers.sharding, 1)}

    record("set_scale_same", same_value)
  else:
    params, _, metrics, first = run(params0, state0, range(STEPS))
    results.update(final=listed(fetch(params)),
                   first_updates=listed(fetch(first)), metrics=metrics)

    def resumed_other_topology():
      restored = restore()
      p, _, _, _ = run(restored["params"], restored["opt_state"],
                       range(SAVED_AT, STEPS))
      return listed(fetch(p))

    record("resume_one", resumed_other_topology)

  path = os.path.join(args.out, f"{args.mode}_{jax.process_index()}.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(results, f)


if __name__ == "__main__":
  main()
