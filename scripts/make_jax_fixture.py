"""Make the JAX fixture in tests/fixtures/jax_ncsnpp/ with the official JAX code.

This is the generator that tests/fixtures/jax_ncsnpp/README.md describes; the committed fixture files were
made by these steps. It writes three things into --out:

* checkpoints/checkpoint_3: a small NCSN++ (nf 4, ch_mult (1, 2, 2), 2 blocks per resolution, everything
  else as in the official configs/cifar10_ve_cd.py) as a `mutils.State`, serialised with
  `flax.serialization.to_bytes`;
* expected.npz: official outputs on that checkpoint, in JAX's NHWC layout: `x`, `t`, the raw network `F`
  (params_ema) and `F_params` (params), the CD/CT parameterisation `f` (`mutils.get_distiller_fn`), the EDM
  teacher's `D` (`mutils.get_denoiser_fn`), and the official Heun sampler's `heun` with its noise
  `heun_prior`;
* cifar10_manifest.json: names and shapes of the full-size CIFAR-10 NCSN++ parameter tree
  (`jax.eval_shape` of `model.init` with configs/cifar10_ve_cd.py unmodified).

Nothing in the repository imports this file and CI does not run it. It needs a side virtual environment
outside the repository (CPU only) with the versions the fixture README names:

    jax 0.10.2, flax 0.12.8, ml_collections, dm-haiku 0.0.17, optax, pillow, scipy, msgpack

and a checkout of openai/consistency_models_cifar10 at commit d086e77 (the folder holding `jcm/` and
`configs/`). Then, from the repository root:

    /path/to/side-venv/bin/python scripts/make_jax_fixture.py --official /path/to/consistency_models_cifar10

The seeds the README leaves unnamed are flags whose defaults are those of the committed files: `params`
from PRNGKey(7), `params_ema` from PRNGKey(8) plus 0.2 x N(0, 1) per leaf (one key a leaf, split from
PRNGKey(3)), and `rng_state` the state of the PRNG sequence that `params`' initialisation drew from.

The official training-only imports (blobfile, h5py, flaxmodels, huggingface_hub) are replaced by empty
modules before the official code is imported; the model code itself is used unchanged.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import types
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "jax_ncsnpp"
OFFICIAL_COMMIT = "d086e77"
# imported by the official training and evaluation code only
STUBBED = ("blobfile", "h5py", "flaxmodels", "huggingface_hub")
CHECKPOINT_NAME = "checkpoint_3"   # the name flax.training.checkpoints gives step 3
STEP = 1234
NOISE_SCALE = 0.2                  # added to params_ema so that the zero-initialised layers are not zero
T_VALUES = (0.002, 0.7, 80.0)
X_SHAPE = (3, 32, 32, 3)
HEUN_SHAPE = (2, 32, 32, 3)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Write the JAX NCSN++ fixture (a Flax checkpoint, expected.npz, cifar10_manifest.json) "
                    "with the official JAX code. Needs jax, flax, ml_collections, dm-haiku and optax.")
    p.add_argument("--official", required=True, type=Path, metavar="PATH",
                   help=f"a checkout of openai/consistency_models_cifar10 at {OFFICIAL_COMMIT} "
                        "(the folder holding jcm/ and configs/)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                   help="where the three outputs go (default: tests/fixtures/jax_ncsnpp)")
    p.add_argument("--seed-params", type=int, default=7, help="PRNGKey seed of `params` (default 7)")
    p.add_argument("--seed-ema", type=int, default=8, help="PRNGKey seed of `params_ema` (default 8)")
    p.add_argument("--seed-noise", type=int, default=3,
                   help="PRNGKey seed of the noise added to params_ema (default 3)")
    p.add_argument("--seed-x", type=int, default=11, help="PRNGKey seed of the inputs x (default 11)")
    p.add_argument("--seed-heun", type=int, default=5, help="PRNGKey seed of the Heun sampler (default 5)")
    return p.parse_args(argv)


def fail(message: str) -> None:
    print(f"make_jax_fixture: {message}", file=sys.stderr)
    sys.exit(1)


def stub_training_imports() -> None:
    """Empty modules in place of the packages only the official training and evaluation code uses."""
    for name in STUBBED:
        sys.modules[name] = types.ModuleType(name)


def import_official(root: Path) -> types.SimpleNamespace:
    """The official modules, from the checkout at `root`."""
    if not (root / "jcm" / "models" / "utils.py").is_file() or not (root / "configs").is_dir():
        fail(f"{root} is not a checkout of openai/consistency_models_cifar10 (no jcm/models/utils.py)")
    stub_training_imports()
    sys.path.insert(0, str(root.resolve()))
    from configs import cifar10_ve_cd
    from jcm import losses, sampling, sde_lib
    from jcm.models import ncsnpp  # noqa: F401  (registers "ncsnpp" with mutils)
    from jcm.models import utils as mutils
    return types.SimpleNamespace(cd_config=cifar10_ve_cd, mutils=mutils, losses=losses, sampling=sampling,
                                 sde_lib=sde_lib)


def small_config(official):
    """configs/cifar10_ve_cd.py scaled down; every other field as released."""
    config = official.cd_config.get_config()
    config.model.nf = 4
    config.model.ch_mult = (1, 2, 2)
    config.model.num_res_blocks = 2
    return config


def init_model(official, key, config):
    """`mutils.init_model`, step for step, with the former `FrozenDict.pop` done by hand.

    The official function unpacks `variables.pop("params")` into (model_state, params), which held while
    `model.init` returned a FrozenDict; current flax returns a plain dict, whose `pop` gives the value alone.
    The split here keeps the tree as `model.init` made it (`flax.core.pop` would copy it with sorted keys,
    which changes the order of the checkpoint's `params`). Also returns the PRNG sequence the keys were
    drawn from (its state goes into the checkpoint).
    """
    import haiku as hk
    import jax
    import jax.numpy as jnp

    rng = hk.PRNGSequence(key)
    model = functools.partial(official.mutils.get_model(config.model.name), config=config)()
    size, channels = config.data.image_size, config.data.num_channels
    fake_input = jnp.zeros((jax.local_device_count(), size, size, channels))
    fake_label = jnp.zeros((jax.local_device_count(),), dtype=jnp.int32)
    variables = model.init({"params": next(rng), "dropout": next(rng)}, fake_input, fake_label)
    model_state = dict(variables)   # (model_state, params) as FrozenDict.pop gave them
    params = model_state.pop("params")
    return model, model_state, params, rng


def make_checkpoint(official, config, args):
    """Step 3 of the README: the state, with params and params_ema from different seeds."""
    import jax

    model, _, params, rng = init_model(official, jax.random.PRNGKey(args.seed_params), config)
    _, _, params_ema, _ = init_model(official, jax.random.PRNGKey(args.seed_ema), config)
    leaves, treedef = jax.tree_util.tree_flatten(params_ema)
    keys = jax.random.split(jax.random.PRNGKey(args.seed_noise), len(leaves))
    leaves = [leaf + NOISE_SCALE * jax.random.normal(key, leaf.shape, leaf.dtype)
              for leaf, key in zip(leaves, keys)]
    params_ema = jax.tree_util.tree_unflatten(treedef, leaves)
    optimizer, _ = official.losses.get_optimizer(config)   # (optimizer, optimize_fn)
    state = official.mutils.State(
        step=STEP, lr=config.optim.lr, ema_rate=config.model.ema_rate, params=params,
        params_ema=params_ema, model_state={}, opt_state=optimizer.init(params),
        rng_state=rng.internal_state)
    return model, state


def make_expected(official, config, model, state, args) -> dict:
    """Steps 4 and 5 of the README: the official outputs on the checkpoint (NHWC numpy arrays)."""
    import flax
    import haiku as hk
    import jax
    import jax.numpy as jnp
    import numpy as np

    mutils = official.mutils
    sde = official.sde_lib.get_sde(config)
    if not isinstance(sde, official.sde_lib.KVESDE):
        fail(f"expected a KVESDE from the CD config, got {type(sde).__name__}")
    x = jax.random.normal(jax.random.PRNGKey(args.seed_x), X_SHAPE)
    t = jnp.asarray(T_VALUES, dtype=jnp.float32)

    def raw(params):
        return model.apply({"params": params}, x, 0.25 * jnp.log(t), train=False)

    out = {"x": x, "t": t, "F": raw(state.params_ema)}
    out["D"] = mutils.get_denoiser_fn(sde, model, state.params_ema, {})(x, t)
    out["f"] = mutils.get_distiller_fn(sde, model, state.params_ema, {})(x, t)   # pred_t = sde.t_min
    out["F_params"] = raw(state.params)

    # the sampler is pmapped: one device, its arguments with a leading device axis
    heun_key = jax.random.PRNGKey(args.seed_heun)
    out["heun_prior"] = sde.prior_sampling(next(hk.PRNGSequence(heun_key)), HEUN_SHAPE)
    sampler = official.sampling.get_heun_sampler(sde, model, HEUN_SHAPE)
    one_device = jax.local_devices()[:1]
    samples, n_levels = sampler(jnp.asarray(heun_key)[None], flax.jax_utils.replicate(state, one_device))
    if int(n_levels[0]) != 18:
        fail(f"the Heun sampler ran {int(n_levels[0])} levels, not 18")
    out["heun"] = samples[0]
    return {k: np.asarray(jax.device_get(v), dtype=np.float32) for k, v in out.items()}


def make_manifest(official) -> dict:
    """The full-size parameter tree's names and shapes, without computing any weights."""
    import jax

    config = official.cd_config.get_config()   # unmodified: nf 128, ch_mult (2, 2, 2), 4 blocks
    shapes = jax.eval_shape(lambda key: flax_variables(official, key, config), jax.random.PRNGKey(0))
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    manifest = {"/".join(str(p.key) for p in path): [int(n) for n in leaf.shape] for path, leaf in flat}
    return dict(sorted(manifest.items()))


def flax_variables(official, key, config):
    """All of `model.init`'s variables ("params" at the top), as `init_model` calls it."""
    _, model_state, params, _ = init_model(official, key, config)
    return {"params": params, **model_state}


def write_manifest(path: Path, manifest: dict) -> None:
    """One leaf a line, its shape on the same line, as the committed manifest is laid out."""
    lines = [f" {json.dumps(name)}: {json.dumps(shape)}" for name, shape in manifest.items()]
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n")


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")   # the fixture was made on a CPU
    try:
        import flax.serialization
        import jax  # noqa: F401
        import numpy as np
    except ImportError as e:
        fail(f"needs jax, flax, ml_collections, dm-haiku and optax in this environment ({e})")
    try:
        official = import_official(args.official)
    except ImportError as e:
        fail(f"importing the official code from {args.official} failed: {e}")

    config = small_config(official)
    model, state = make_checkpoint(official, config, args)
    expected = make_expected(official, config, model, state, args)
    manifest = make_manifest(official)

    ckpt = args.out / "checkpoints" / CHECKPOINT_NAME
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_bytes(flax.serialization.to_bytes(state))
    np.savez(args.out / "expected.npz", **expected)
    write_manifest(args.out / "cifar10_manifest.json", manifest)
    total = sum(int(np.prod(s)) for s in manifest.values())
    print(f"wrote {ckpt} ({ckpt.stat().st_size} bytes), {args.out / 'expected.npz'} "
          f"(max |F| {np.abs(expected['F']).max():.3g}) and {args.out / 'cifar10_manifest.json'} "
          f"({len(manifest)} leaves, {total:,} values)")


if __name__ == "__main__":
    main()
