"""Weights that libraries keep in torch.hub's cache (LPIPS' VGG16, FID's Inception) are read by the project.

torchvision and torch-fidelity would unpickle a cached file with weights_only=False and check its hash only
on download, so a pickle planted in `$TORCH_HOME/hub/checkpoints/` ran whenever LPIPS or FID was built.
cm.read_hub_weights checks the sha256 prefix in the file's name on every use, loads with weights_only=True,
and hands the libraries tensors.
"""
import hashlib
import http.server
import os
import threading
from pathlib import Path

import pytest
import torch
import torchvision

import cm
import full.evaluate as ev


class Planted:
    """A pickle that creates `marker` when unpickled with weights_only=False."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _hub(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    return hub


def _named_by_hash(folder: Path, stem: str, write) -> Path:
    """Write a file, then name it `stem-<sha256 prefix>.pth` as torch.hub's released files are."""
    tmp = folder / "tmp.pth"
    write(tmp)
    prefix = hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]
    return tmp.rename(folder / f"{stem}-{prefix}.pth")


def _vgg16_features() -> dict:
    torch.manual_seed(0)
    return {k: v for k, v in torchvision.models.vgg16(weights=None).state_dict().items()
            if k.startswith("features.")}


@pytest.mark.parametrize("named_by_hash", [False, True])
def test_a_planted_pickle_never_runs_when_lpips_or_inception_is_built(tmp_path, monkeypatch, named_by_hash):
    """Under the real cache name the hash refuses it; renamed to its own hash, weights_only refuses it."""
    hub = _hub(tmp_path, monkeypatch)
    marker = tmp_path / "ran"
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    builds = ((cm.VGG16_URL, lambda: cm.LPIPS()), (URL_INCEPTION_V3, lambda: ev.InceptionExtractor("cpu")))
    for url, build in builds:
        name = os.path.basename(url)
        if named_by_hash:
            path = _named_by_hash(hub, "planted", lambda p: torch.save(Planted(marker), p))
            url = url.rsplit("/", 1)[0] + "/" + path.name
            monkeypatch.setattr(cm, "VGG16_URL", url)
            monkeypatch.setattr("torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3", url)
        else:
            torch.save(Planted(marker), hub / name)
        with pytest.raises(cm.CMError, match="weights-only" if named_by_hash else "sha256"):
            build()
        assert not marker.exists()


def test_lpips_uses_the_cached_vgg16_features_it_checked(tmp_path, monkeypatch):
    hub = _hub(tmp_path, monkeypatch)
    state = _vgg16_features()
    path = _named_by_hash(hub, "vgg16", lambda p: torch.save(state, p))
    monkeypatch.setattr(cm, "VGG16_URL", "https://download.pytorch.org/models/" + path.name)
    net = cm.LPIPS().net.net
    got = {k: v for block in net.children() for k, v in block.state_dict().items()}
    assert len(got) == len(state) == 26  # 13 convolutions
    assert all(torch.equal(got[k], state[f"features.{k}"]) for k in got)
    with open(path, "r+b") as fh:  # one flipped byte: the name's hash no longer holds
        fh.seek(path.stat().st_size // 2)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 1]))
    with pytest.raises(cm.CMError, match="sha256"):
        cm.LPIPS()


def test_an_empty_cache_downloads_checks_and_loads(tmp_path, monkeypatch):
    """A local server on 127.0.0.1 plays download.pytorch.org: the file arrives, is checked, is used; a
    server that sends other bytes under the name leaves nothing in the cache and one line."""
    hub = _hub(tmp_path, monkeypatch)
    served = tmp_path / "served"
    served.mkdir()
    state = _vgg16_features()
    good = _named_by_hash(served, "vgg16", lambda p: torch.save(state, p))
    (served / "vgg16-00000000.pth").write_bytes(good.read_bytes())  # the same bytes under a wrong hash

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(served), **k)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        monkeypatch.setattr(cm, "VGG16_URL", base + good.name)
        block = next(cm.LPIPS().net.net.children())
        assert torch.equal(block.state_dict()["0.weight"], state["features.0.weight"])
        assert (hub / good.name).read_bytes() == good.read_bytes()
        monkeypatch.setattr(cm, "VGG16_URL", base + "vgg16-00000000.pth")
        with pytest.raises(cm.CMError, match="not available"):
            cm.LPIPS()
        assert sorted(p.name for p in hub.iterdir()) == [good.name]
    finally:
        server.shutdown()
