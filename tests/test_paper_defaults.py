"""cm.py's CIFAR-10 defaults against the papers' runs, and the editing defaults per dataset.

Constants: [CM Tab. 3] evaluates EMA 0.9999 on CIFAR-10 (CD and CT), with no warm-up (the JAX code's
`ema_rate` is a constant); locuslab/ect trains without flips (ct_train.py `--xflip` default False,
run_ecm.sh `--augment=0.0`).
"""
import pytest

import cm


@pytest.mark.parametrize("mode", ["cd", "ct"])
def test_cifar10_cd_ct_evaluate_the_papers_ema_without_warmup(mode):
    cfg = cm.config("cifar10", mode)
    assert cfg.ema == 0.9999 and cfg.ema_warmup is False
    assert cfg.flip is True  # the CM runs flip (configs/default_cifar10_configs.py: random_flip)


def test_cifar10_ect_does_not_flip():
    assert cm.config("cifar10", "ect").flip is False


def test_small_datasets_keep_the_short_run_defaults():
    for ds in ("digits", "toy"):
        cfg = cm.config(ds, "cd")
        assert cfg.ema == 0.999 and cfg.ema_warmup is True and cfg.flip is False


def test_the_trainer_uses_the_rate_without_warmup(tmp_path):
    """One step with ema_warmup off: θ_ema = r θ_ema0 + (1 - r) θ_1 with r = cfg.ema, not (1+0)/(10+0)."""
    import torch
    cfg = cm.config("toy", "edm", steps=1, ema=0.5, ema_warmup=False, report=False)
    tr = cm.Run(cfg, torch.device("cpu"), tmp_path)
    before = [p.detach().clone() for p in tr.ema.parameters()]
    tr.train_step()
    for e0, e1, p in zip(before, tr.ema.parameters(), tr.model.parameters()):
        torch.testing.assert_close(e1, 0.5 * e0 + 0.5 * p.detach())
