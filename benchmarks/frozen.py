"""A frozen backbone, end to end: what a fine-tuning step costs.

A transformer encoder in Flax linen (``--model small``: 12 blocks of width 256
for the CPU; ``--model bert_base``: BERT-base sizes for a GPU) with a
classification head, on generated tokens. The embeddings and the lower 75%
of the blocks are frozen. Each variant is one jitted training step (forward,
backward, ``clip_by_global_norm(1.0)`` and ``adamw``, then the parameters
updated), donated and compiled once; all are timed in one process,
interleaved round by round:

* ``full``: fine-tune everything, the baseline;
* ``optax.freeze``: ``optax.chain(clip, adamw, optax.freeze(mask))``, the
  simplest optax way to freeze: zero updates, but adamw still holds and
  updates state for every parameter;
* ``optax.partition``: what optax's documentation recommends,
  ``optax.partition({"train": chain(clip, adamw), "frozen":
  optax.set_to_zero()}, labels)``;
* ``lw.freeze``: ``lw.freeze(chain(clip, adamw), frozen)``;
* ``lw.freeze+sg``: the same with ``lw.stop_gradient(params, frozen)`` in the
  loss;
* ``lw.freeze+grad``: the same with ``lw.value_and_grad(loss, frozen)``
  instead of ``jax.value_and_grad``: no gradient at all (``None``) for the
  frozen leaves.

``--grads-used`` makes every step also return the global norm of all the
gradients, as a training loop that logs it does; then nothing can drop
the frozen layers' backward pass except ``lw.stop_gradient`` and
``lw.value_and_grad``.

Prints, as ratios to ``full``: the median step time, XLA's flop count of the
compiled step (``cost_analysis``), the compiled step's peak memory
(``memory_analysis``: arguments + outputs - donated + temporaries), the
optimizer-state bytes, and the peak memory of the gradient function compiled
on its own (``grads``: the gradients leave the jitted function, as when they
are accumulated over micro-batches or all-reduced outside the step);
writes them as JSON (``--out``).

Run:  python benchmarks/frozen.py [--model small] [--steps 5] [--repeats 3]
      [--grads-used] [--out frozen.json]
"""

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import layerwise as lw

import groups as bench

MODELS = {  # blocks, width, heads, ffn, vocabulary, sequence, batch
    "small": dict(blocks=12, d=256, heads=4, ff=1024, vocab=8192, seq=128, batch=8),
    "bert_base": dict(blocks=12, d=768, heads=12, ff=3072, vocab=30522, seq=512,
                      batch=16),
}
CLASSES = 4
FROZEN_SHARE = 0.75


class Block(nn.Module):
  d: int
  heads: int
  ff: int

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="attn_norm")(x)
    x = x + nn.MultiHeadDotProductAttention(self.heads, name="attn")(h, h)
    h = nn.LayerNorm(name="ffn_norm")(x)
    h = nn.Dense(self.d, name="ffn_out")(nn.gelu(nn.Dense(self.ff, name="ffn_in")(h)))
    return x + h


class Encoder(nn.Module):
  """Token and position embeddings, ``blocks`` pre-norm blocks, a mean-pool head."""
  blocks: int
  d: int
  heads: int
  ff: int
  vocab: int
  seq: int

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, self.d, name="embed")(tokens)
    x = x + nn.Embed(self.seq, self.d, name="position")(jnp.arange(tokens.shape[1]))
    for i in range(self.blocks):
      x = Block(self.d, self.heads, self.ff, name=f"layers_{i}")(x)
    x = nn.LayerNorm(name="final_norm")(x).mean(axis=1)
    return nn.Dense(CLASSES, name="head")(x)


def frozen_selector(blocks):
  """The embeddings and the lower ``FROZEN_SHARE`` of the blocks."""
  lower = int(blocks * FROZEN_SHARE)
  return lw.any_of("embed/**", "position/**",
                   *(f"layers_{i}/**" for i in range(lower)))


def optimizers(frozen, mask):
  """The variants; ``mask`` is ``frozen`` resolved to a tree of bools."""
  inner = lambda: optax.chain(optax.clip_by_global_norm(1.0),
                              optax.adamw(1e-4, weight_decay=0.01))
  labels = lw.labels({frozen: "frozen", "**": "train"})
  return {
      "full": (inner(), False),
      "optax.freeze": (optax.chain(inner(), optax.freeze(mask)), False),
      "optax.partition": (optax.partition(
          {"train": inner(), "frozen": optax.set_to_zero()}, labels), False),
      "lw.freeze": (lw.freeze(inner(), frozen), False),
      "lw.freeze+sg": (lw.freeze(inner(), frozen), True),
      "lw.freeze+grad": (lw.freeze(inner(), frozen), "grad"),
  }


def make_step(model, tx, frozen, stop, grads_used):
  """The training step; ``stop``: ``True`` for ``lw.stop_gradient`` in the
  loss, ``"grad"`` for ``lw.value_and_grad``."""
  def loss_fn(params, tokens, labels):
    if stop is True:
      params = lw.stop_gradient(params, frozen)
    logits = model.apply({"params": params}, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  value_and_grad = (lw.value_and_grad(loss_fn, frozen) if stop == "grad"
                    else jax.value_and_grad(loss_fn))

  def step(params, state, tokens, labels):
    loss, grads = value_and_grad(params, tokens, labels)
    updates, state = tx.update(grads, state, params)
    out = (loss, optax.global_norm(grads)) if grads_used else loss
    return optax.apply_updates(params, updates), state, out
  return step, value_and_grad


def compiled_costs(compiled):
  """Flops and peak bytes of a compiled step, from XLA's analyses."""
  cost = bench.cost_analysis(compiled)
  mem = compiled.memory_analysis()
  peak = getattr(mem, "peak_memory_in_bytes", 0) or (
      mem.argument_size_in_bytes + mem.output_size_in_bytes
      - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
  return float(cost["flops"]), int(peak)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="small", choices=sorted(MODELS))
  parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
  parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
  parser.add_argument("--grads-used", action="store_true",
                      help="every step also returns the global norm of all gradients")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()

  bench.print_versions()
  sizes = MODELS[args.model]
  model = Encoder(**{k: v for k, v in sizes.items() if k != "batch"})
  key_p, key_t, key_l = jax.random.split(jax.random.PRNGKey(0), 3)
  tokens = jax.random.randint(key_t, (sizes["batch"], sizes["seq"]), 0, sizes["vocab"])
  labels = jax.random.randint(key_l, (sizes["batch"],), 0, CLASSES)
  params = jax.jit(model.init)(key_p, tokens)["params"]
  frozen = frozen_selector(sizes["blocks"])
  n = sum(x.size for x in jax.tree_util.tree_leaves(params))
  mask = lw.resolve({frozen: True, "**": False}, params)
  n_frozen = sum(x.size for x, f in zip(jax.tree_util.tree_leaves(params),
                                        jax.tree_util.tree_leaves(mask)) if f)
  print(f"model {args.model}: {sizes}; {n / 1e6:.1f}M parameters, "
        f"{n_frozen / n:.0%} of them frozen (the embeddings and "
        f"{int(sizes['blocks'] * FROZEN_SHARE)} of {sizes['blocks']} blocks)"
        + ("; steps return the gradients' global norm" if args.grads_used else ""),
        flush=True)

  built, rows = {}, []
  for name, (tx, stop) in optimizers(frozen, mask).items():
    step, grad_fn = make_step(model, tx, frozen, stop, args.grads_used)
    p = jax.tree_util.tree_map(jnp.copy, params)
    state = tx.init(p)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
        p, state, tokens, labels).compile()
    compile_s = time.perf_counter() - t0
    flops, peak = compiled_costs(compiled)
    _, grads_peak = compiled_costs(jax.jit(grad_fn).lower(p, tokens, labels)
                                   .compile())
    state_bytes = bench.state_bytes(tx, p)
    built[name] = (compiled, [p, state])
    rows.append(dict(variant=name, compile_s=compile_s, flops=flops,
                     peak_bytes=peak, state_bytes=state_bytes,
                     grads_peak_bytes=grads_peak))

  def run(compiled, carry, steps):
    t0 = time.perf_counter()
    for _ in range(steps):
      carry[0], carry[1], out = compiled(carry[0], carry[1], tokens, labels)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / steps

  for compiled, carry in built.values():  # warm-up
    run(compiled, carry, 2)
  samples = {name: [] for name in built}
  for _ in range(args.repeats):
    for name, (compiled, carry) in built.items():
      samples[name].append(run(compiled, carry, args.steps))

  header = (f"{'variant':<16} {'step ms':>8} {'step x':>7} {'flops x':>7} "
            f"{'peak MB':>8} {'peak x':>7} {'state MB':>8} {'state x':>7} "
            f"{'grads MB':>8} {'grads x':>7} {'compile s':>9}")
  print(header)
  print("-" * len(header))
  base = None
  for row in rows:
    row["step_ms"] = 1e3 * statistics.median(samples[row["variant"]])
    base = base or dict(row)
    for k in ("step_ms", "flops", "peak_bytes", "state_bytes"):
      row[k.split("_")[0] + "_ratio"] = row[k] / base[k]
    row["grads_peak_ratio"] = row["grads_peak_bytes"] / base["grads_peak_bytes"]
    print(f"{row['variant']:<16} {row['step_ms']:>8.1f} {row['step_ratio']:>7.2f} "
          f"{row['flops_ratio']:>7.2f} {row['peak_bytes'] / 2**20:>8.1f} "
          f"{row['peak_ratio']:>7.2f} {row['state_bytes'] / 2**20:>8.1f} "
          f"{row['state_ratio']:>7.2f} {row['grads_peak_bytes'] / 2**20:>8.1f} "
          f"{row['grads_peak_ratio']:>7.2f} {row['compile_s']:>9.2f}", flush=True)
  bench.write_json(args.out, dict(
      device=jax.devices()[0].device_kind, model=args.model, sizes=sizes,
      parameters=n, frozen_parameters=n_frozen, grads_used=args.grads_used,
      rows=rows))


if __name__ == "__main__":
  main()
