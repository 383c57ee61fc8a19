"""Fine-tune a pretrained CNN on new classes, with per-layer rules (the main example).

scikit-learn's bundled 8x8 handwritten digits (nothing is downloaded) are
split in two halves of the images. A small Flax CNN (four blocks and a head)
is pretrained to tell all ten digits apart on the first half: the "large
labelled data set" of this example. The new task is a different one on
unseen images: tell the digits 5-9 of the second half apart, from only a few
labelled images per class. ``lw.transplant`` copies the pretrained blocks
into a new model whose five-way head is freshly initialised, and the
recipes below train it side by side from the same weights, with the same
AdamW:

* one rate: every parameter at the same rate (what one writes without
  per-layer rules);
* frozen backbone: ``lw.freeze`` keeps the convolutions fixed (no optimizer
  state for them) and ``lw.stop_gradient`` skips their backward pass;
* frozen backbone, cached features: the same, but the convolutions' output
  for each training image is computed once (``CNN.features``) and the steps
  train ``block_3`` and the head on it (``CNN.classify``): no forward pass
  through the backbone either. The script asserts that it ends with the
  same parameters, bit for bit, as frozen backbone;
* layer decay + clip: timm-style layer-wise rate decay (``lw.layer_decay``)
  and unit-wise adaptive clipping (AGC) of the backbone's gradients, the new
  head unclipped (``lw.clip_by_rules``);
* head first, then decay: the same, with the backbone's multipliers 0 for
  the first third of training (a schedule per group), so the random head
  settles before it can distort the pretrained features (LP-FT, gradual
  unfreezing).

One more run, the same CNN trained from scratch with one rate, shows what
the pretrained weights are worth. The script prints each recipe's rules
(``lw.describe``), a line per ``--log-every`` epochs while training, a table
of test accuracy, step time, time per epoch (the steps of an epoch, the
first quarter of the epochs left out as for the steps: they compile) and
optimizer-state bytes (over the seeds), and saves the learning curves to
``--plot`` (a PNG).

Run:  python examples/finetune.py [--epochs 60] [--seeds 0 1 2] [--labels 5]
"""

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax import linen as nn
from sklearn.datasets import load_digits

import layerwise as lw

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


class CNN(nn.Module):
  """Three convolutions and a dense layer (``block_0`` to ``block_3``), a head.

  Two methods split it where the backbone ends: ``features`` (the
  convolutions, ``BACKBONE``) and ``classify`` (the rest), so that
  ``model.apply(params, x, method=CNN.features)`` runs the frozen part alone.
  """
  classes: int = 5

  def setup(self):
    self.block_0 = nn.Conv(32, (3, 3))
    self.block_1 = nn.Conv(64, (3, 3))
    self.block_2 = nn.Conv(64, (3, 3))
    self.block_3 = nn.Dense(128)
    self.head = nn.Dense(self.classes)

  def __call__(self, x):
    return self.classify(self.features(x))

  def features(self, x):
    x = nn.relu(self.block_0(x))
    x = nn.relu(self.block_1(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    return nn.relu(self.block_2(x))

  def classify(self, h):
    h = nn.relu(self.block_3(h.reshape(h.shape[0], -1)))
    return self.head(h)


BACKBONE = "block_[012]/**"        # the convolutions
CACHED = "frozen backbone, cached features"
LR, WEIGHT_DECAY, BATCH = 1e-3, 1e-4, 10


def recipes(params, head_only_steps):
  """name -> (optimizer, the selector of frozen leaves or None)."""
  adamw = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
  clip = lw.clip_by_rules({"head/**": None, "**": lw.clip_adaptive(0.05)})
  decay = lw.scale_by_rules(lw.layer_decay(0.5, params))
  unfreeze = lw.scale_by_rules({      # multipliers may be schedules
      "head/**": 1.0,
      "**": lambda step: (step >= head_only_steps).astype(jnp.float32),
  })
  return {
      "one rate": (adamw, None),
      "frozen backbone": (lw.freeze(adamw, BACKBONE), BACKBONE),
      CACHED: (lw.freeze(adamw, BACKBONE), BACKBONE),   # train() caches
      "layer decay + clip": (optax.chain(clip, adamw, decay), None),
      "head first, decay": (optax.chain(clip, adamw, decay, unfreeze), None),
  }


def load(seed, labels_per_class):
  """Half the images, all ten digits, for pretraining; the digits 5-9 of the
  other half split into a few labelled images per class and a test set."""
  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(y))
  first, second = order[:len(y) // 2], order[len(y) // 2:]
  new = second[y[second] >= 5]
  labelled = np.concatenate([
      rng.choice(new[y[new] == c], labels_per_class, replace=False)
      for c in range(5, 10)])
  test = np.setdiff1d(new, labelled)
  return ((x[first], y[first]), (x[labelled], y[labelled] - 5),
          (x[test], y[test] - 5))


def make_step(model, tx, frozen, method=None):
  def loss_fn(params, x, y):
    if frozen is not None:
      params = lw.stop_gradient(params, frozen)   # no backward for them
    logits = model.apply(params, x, method=method)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def batches(x, size, rng):
  """One epoch: the indices of each shuffled batch (the last partial one
  dropped)."""
  order = rng.permutation(len(x))
  for i in range(0, len(x) - size + 1, size):
    yield order[i:i + size]


def accuracy(model, params, data):
  x, y = data
  return float((_predict(model, params, x) == y).mean())


@functools.partial(jax.jit, static_argnums=0)
def _predict(model, params, x):
  return model.apply(params, x).argmax(-1)


def cache_features(model, params, x, batch_size=256):
  """The frozen backbone's output for every image: computed once (jitted, in
  batches), kept in host memory, the whole data set's worth."""
  return np.concatenate([
      np.asarray(_features(model, params, x[i:i + batch_size]))
      for i in range(0, len(x), batch_size)])


@functools.partial(jax.jit, static_argnums=0)
def _features(model, params, x):
  return model.apply(params, x, method=CNN.features)


def train(model, tx, frozen, params, train_data, test_data, epochs, seed,
          log_every, name, cached=False):
  """Trains; returns per-epoch test accuracy and train loss, step and epoch
  times, the final params and state, and the seconds the cache took."""
  x, y = train_data
  cache_s = None
  if cached:
    # The frozen backbone's output for an image never changes: compute it
    # once, and train block_3 and the head on it (the same optimizer, the
    # same batches; the frozen leaves get zero gradients, freeze drops them).
    t0 = time.perf_counter()
    x = cache_features(model, params, x)
    cache_s = time.perf_counter() - t0
    step = make_step(model, tx, frozen, method=CNN.classify)
  else:
    step = make_step(model, tx, frozen)
  opt_state = tx.init(params)
  rng = np.random.default_rng(seed)
  curve, losses, times, epoch_times = [], [], [], []
  for epoch in range(1, epochs + 1):
    epoch_loss, epoch_time = [], 0.0
    for b in batches(x, BATCH, rng):
      t0 = time.perf_counter()
      params, opt_state, loss = step(params, opt_state, x[b], y[b])
      loss = float(loss)                  # waits for the step to finish
      times.append(time.perf_counter() - t0)
      epoch_time += times[-1]
      epoch_loss.append(loss)
    epoch_times.append(epoch_time)
    curve.append(accuracy(model, params, test_data))
    losses.append(float(np.mean(epoch_loss)))
    if log_every and (epoch % log_every == 0 or epoch == epochs):
      print(f"  {name:<32} epoch {epoch:3d}/{epochs}  loss {losses[-1]:.4f}  "
            f"test accuracy {100 * curve[-1]:5.1f}%", flush=True)
  # The first steps include compilation: time the rest.
  return (curve, losses, times[len(times) // 4:],
          epoch_times[len(epoch_times) // 4:], params, opt_state, cache_s)


def pretrain(seed, data, epochs=20):
  model = CNN(classes=10)
  params = model.init(jax.random.PRNGKey(seed), data[0][:1])
  tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
  step, opt_state = make_step(model, tx, None), tx.init(params)
  x, y = data
  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    for b in batches(x, 32, rng):
      params, opt_state, _ = step(params, opt_state, x[b], y[b])
  return params


def state_bytes(opt_state):
  return sum(x.nbytes for x in jax.tree.leaves(opt_state))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=60,
                      help="fine-tuning epochs per recipe")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                      help="one run of every recipe per seed")
  parser.add_argument("--labels", type=int, default=5,
                      help="labelled images per new class")
  parser.add_argument("--log-every", type=int, default=10,
                      help="epochs between progress lines (0: none)")
  parser.add_argument("--plot", default="finetune.png",
                      help="where to save the learning curves")
  args = parser.parse_args()

  model = CNN(classes=5)
  results = {}
  for n, seed in enumerate(args.seeds):
    old, train_data, test_data = load(seed, args.labels)
    t0 = time.perf_counter()
    pretrained = pretrain(seed, old)
    print(f"seed {seed}: pretrained on digits 0-9 ({len(old[0])} images) in "
          f"{time.perf_counter() - t0:.1f} s; fine-tuning on digits 5-9 of "
          f"other images with {len(train_data[0])} labels, testing on "
          f"{len(test_data[0])}")
    fresh = model.init(jax.random.PRNGKey(seed + 1000), train_data[0][:1])
    params, report = lw.transplant(fresh, pretrained, lw.not_("head/**"))
    if n == 0:
      print(report, "\n")
    steps_per_epoch = len(train_data[0]) // BATCH
    runs = dict(recipes(params, args.epochs // 3 * steps_per_epoch))
    runs["scratch, one rate"] = (runs["one rate"][0], None)
    for name, (tx, frozen) in runs.items():
      if n == 0:
        print(f"{name}:\n{lw.describe(tx, params)}\n")
      start = fresh if name.startswith("scratch") else params
      curve, losses, times, epoch_times, final, opt_state, cache_s = train(
          model, tx, frozen, start, train_data, test_data, args.epochs, seed,
          args.log_every, name, cached=name == CACHED)
      r = results.setdefault(name, {"curves": [], "losses": [], "times": [],
                                    "epoch_times": [], "params": [],
                                    "cache_s": []})
      r["curves"].append(curve)
      r["losses"].append(losses)
      r["times"].extend(times)
      r["epoch_times"].extend(epoch_times)
      r["params"].append(final)
      r["cache_s"].append(cache_s)
      r["state_bytes"] = state_bytes(opt_state)

  # Nothing in the frozen convolutions is random or keeps batch statistics
  # (no dropout, no batch norm), so training on their cached output is the
  # same computation as running them in every step: the same parameters, bit
  # for bit, hence the same accuracy at every epoch, for every seed.
  frozen_run, cached_run = results["frozen backbone"], results[CACHED]
  assert cached_run["curves"] == frozen_run["curves"], "cached != frozen"
  for a, b in zip(cached_run["params"], frozen_run["params"]):
    assert jax.tree.all(jax.tree.map(lambda u, v: bool((u == v).all()), a, b))

  base_ms = 1e3 * np.median(results["one rate"]["times"])
  print(f"\nDigits 5-9 with {args.labels} labels per class, {args.epochs} "
        f"epochs, seeds {args.seeds} (mean ± std of the final test accuracy)")
  width = max(map(len, results))     # the longest recipe name
  print(f"{'recipe':<{width}} {'accuracy':>15} {'step ms':>8} "
        f"{'vs one rate':>11} {'epoch ms':>9} {'opt state':>12}")
  for name, r in results.items():
    final = 100 * np.array([c[-1] for c in r["curves"]])
    ms = 1e3 * np.median(r["times"])
    print(f"{name:<{width}} {final.mean():7.1f} ± {final.std():4.1f}% "
          f"{ms:8.3f} {ms / base_ms:10.2f}x "
          f"{1e3 * np.median(r['epoch_times']):9.3f} "
          f"{r['state_bytes'] / 1024:8.1f} KiB")
  first, *later = 1e3 * np.array(cached_run["cache_s"])
  print(f"\n{CACHED}: the same parameters as frozen backbone, bit for bit;\n"
        f"the backbone's one pass over the {len(train_data[0])} training "
        f"images (once per run) took {first:.1f} ms in the first run\n"
        f"(compiling included)"
        + (f", {np.median(later):.1f} ms in the others" if later else ""))

  fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
  epochs = np.arange(1, args.epochs + 1)
  for name, r in results.items():
    acc = 100 * np.array(r["curves"])
    style = "--" if name == CACHED else "-"   # on top of frozen backbone
    line, = ax_acc.plot(epochs, acc.mean(0), style, label=name)
    if name != CACHED:
      ax_acc.fill_between(epochs, acc.min(0), acc.max(0), alpha=0.15,
                          color=line.get_color())
    ax_loss.semilogy(epochs, np.mean(r["losses"], 0), style, label=name)
  ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)",
             title=f"digits 5-9, {args.labels} labels per class")
  ax_loss.set(xlabel="epoch", ylabel="training loss")
  ax_acc.legend(loc="lower right")
  fig.suptitle(f"Fine-tuning a CNN pretrained on digits 0-9 (mean over "
               f"seeds {args.seeds}; band: min to max)")
  fig.tight_layout()
  fig.savefig(args.plot, dpi=110)
  print(f"\nlearning curves saved to {args.plot}")


if __name__ == "__main__":
  main()
