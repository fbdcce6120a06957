"""Released weights by name (full/released/hub.py): download into the cache, reuse, resume, checksums,
mirrors.

Every download here goes to a local HTTP server on 127.0.0.1 through CM_WEIGHTS_MIRROR; a guard fails any
test that would open another address. The served files are small files in the official layouts, written
by the fixture writers of tests/test_released*.py.
"""
from __future__ import annotations

import hashlib
import io
import re
import socket
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import test_released
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_released import random_state_dict, tiny_cond, write_edm_pickle
from test_released_flax import CKPT

import full.sample
import full.train
from cm import CMError
from full import checkpoints
from full.released import __main__ as listing
from full.released import hub

tiny_archs, persistence = test_released.tiny_archs, test_released.persistence  # fixtures
CM_HOST = "openaipublic.blob.core.windows.net"
EDM_HOST = "nvlabs-fi-cdn.nvidia.com"


class Server:
    """Serves `files` (URL path -> bytes) on 127.0.0.1 with Range support; logs (path, Range header, bytes
    sent); a path in `cut` gets its next response cut off after cut[path] bytes of the body (its full
    Content-Length announced); `delay` seconds pass before each response."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.log: list[tuple[str, str | None, int]] = []
        self.cut: dict[str, int] = {}
        self.ranges = True
        self.delay = 0.0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                time.sleep(server.delay)
                data = server.files.get(self.path)
                rng = self.headers.get("Range")
                if data is None:
                    server.log.append((self.path, rng, 0))
                    self.send_error(404)
                    return
                start = int(rng.split("=")[1].split("-")[0]) if rng and server.ranges else 0
                if start >= len(data) and start:
                    server.log.append((self.path, rng, 0))
                    self.send_error(416)
                    return
                body = data[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path in server.cut:
                    body = body[:server.cut.pop(self.path)]
                server.log.append((self.path, rng, len(body)))  # first: the client may finish before
                self.wfile.write(body)
                self.wfile.flush()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def hits(self, path: str) -> int:
        return sum(p == path for p, _, _ in self.log)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def local_only(monkeypatch):
    """Any URL opened in these tests must be on 127.0.0.1."""
    real = urllib.request.urlopen

    def guarded(req, *a, **k):
        url = req.full_url if isinstance(req, urllib.request.Request) else req
        assert urllib.parse.urlsplit(url).hostname == "127.0.0.1", f"a test tried to open {url}"
        return real(req, *a, **k)
    monkeypatch.setattr(urllib.request, "urlopen", guarded)


@pytest.fixture
def server(monkeypatch, tmp_path):
    s = Server()
    monkeypatch.setenv("CM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(hub.MIRROR_ENV, s.url)
    yield s
    s.close()


def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def served_path(url: str) -> str:
    u = urllib.parse.urlsplit(url)
    return f"/{u.netloc}{u.path}"


def serve(server: Server, name: str, data: bytes) -> tuple[str, Path]:
    """Put `data` at the mirror path of release `name`; (its server path, where the cache must keep it)."""
    url = hub.RELEASES[name].url
    server.files[served_path(url)] = data
    u = urllib.parse.urlsplit(url)
    return served_path(url), Path(hub.cache_dir(), "weights", u.netloc, *u.path.strip("/").split("/"))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------
# First download, reuse, the three formats loaded by name


def test_first_call_downloads_and_the_second_reuses_the_cache(server, tiny_archs):
    sd = random_state_dict(tiny_cond())
    data = torch_bytes(sd)
    spath, where = serve(server, "cd_imagenet64_l2", data)
    got = hub.resolve("cd_imagenet64_l2")
    assert got == where and got.read_bytes() == data
    assert where.with_name(where.name + ".sha256").read_text().split()[0] == sha(data)
    assert not where.with_name(where.name + ".part").exists()
    assert server.hits(spath) == 1
    assert hub.resolve("cd_imagenet64_l2.pt") == where  # the file name too, from the cache
    state = checkpoints.load("cd_imagenet64_l2")  # loaded as the local file is
    assert server.hits(spath) == 1
    assert state["official"]["kind"] == "cd"
    ema = next(iter(state["ema"].values()))
    assert all(torch.equal(ema[f"net.{k}"], v) for k, v in sd.items())


def test_sample_by_name_writes_a_grid(server, tiny_archs, tmp_path):
    serve(server, "edm_imagenet64_ema", torch_bytes(random_state_dict(tiny_cond())))
    full.sample.main(["--checkpoint", "edm_imagenet64_ema", "--sampler", "heun", "--steps", "4",
                      "--num-samples", "2", "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "samples.png").stat().st_size > 0


def test_edm_pickle_by_name_as_sample_checkpoint_and_train_teacher(server, persistence, tmp_path):
    write_edm_pickle(tmp_path / "x.pkl", sigma_min=0.02, sigma_max=100)
    spath, where = serve(server, "edm-cifar10-32x32-uncond-ve", (tmp_path / "x.pkl").read_bytes())
    assert where.name == "edm-cifar10-32x32-uncond-ve.pkl" and where.parent.name == "pretrained"
    full.sample.main(["--checkpoint", "edm-cifar10-32x32-uncond-ve", "--sampler", "heun", "--steps", "3",
                      "--num-samples", "2", "--out", str(tmp_path / "s")])
    small = ["data.name='digits'", "data.root=''", "data.num_workers=0", "net.img_resolution=8",
             "net.in_channels=1", "net.out_channels=1", "net.model_channels=16", "net.channel_mult=(1,2)",
             "net.num_blocks=1", "net.attn_resolutions=(4,)", "cm.metric='l2'", "opt.batch=4", "opt.steps=1",
             "run.sample_num=2", f"run.out={str(tmp_path / 'cd')!r}"]
    full.train.main(["--preset", "cifar10-cd-lpips", "run.teacher='edm-cifar10-32x32-uncond-ve'", *small])
    assert checkpoints.latest(tmp_path / "cd").name == "ckpt-0000001.pt"
    assert server.hits(spath) == 1 and not persistence.exists()


@pytest.mark.parametrize("name, kind, preset", [("cd-lpips", "cd", "cifar10-cd-lpips"),
                                                ("cd-l1", "cd", "cifar10-cd-l1"),
                                                ("edm_cifar10_ema", "edm", "cifar10-edm"),
                                                ("continuous-ct-l2", "ct", "cifar10-ct")])
def test_flax_checkpoints_by_name_keep_the_kind_their_official_path_says(server, name, kind, preset):
    spath, where = serve(server, name, CKPT.read_bytes())
    state = checkpoints.load(name)
    assert state["official"]["format"] == "flax-msgpack" and state["official"]["kind"] == kind
    assert state["config"]["preset"] == preset
    assert server.hits(spath) == 1 and where.read_bytes() == CKPT.read_bytes()


# ----------------------------------------------------------------------------------------------
# Interrupted downloads, checksums


@pytest.mark.parametrize("ranges", [True, False])
def test_a_download_cut_off_halfway_leaves_no_file_and_resumes_with_range(server, ranges):
    data = bytes(range(256)) * 1000 + b"tail"
    spath, where = serve(server, "ct_cat256", data)
    server.cut[spath] = len(data) // 2
    server.ranges = ranges
    with pytest.raises(CMError) as e:
        hub.resolve("ct_cat256")
    half = len(data) // 2
    msg = str(e.value)
    assert "\n" not in msg and f"stopped at {half} of {len(data)} bytes" in msg and "resume" in msg, msg
    part = where.with_name(where.name + ".part")
    assert not where.exists() and part.read_bytes() == data[:half]
    assert hub.resolve("ct_cat256") == where and where.read_bytes() == data and not part.exists()
    assert server.log[-1] == ((spath, f"bytes={half}-", len(data) - half) if ranges
                              else (spath, f"bytes={half}-", len(data)))  # a server ignoring Range: all again
    assert where.with_name(where.name + ".sha256").read_text().split()[0] == sha(data)


@given(data=st.binary(min_size=1, max_size=3000), frac=st.floats(0, 1, exclude_max=True))
def test_a_download_cut_anywhere_resumes_to_the_same_bytes(server, data, frac):
    spath, where = serve(server, "ct_imagenet64", data)
    for p in where.parent.glob("ct_imagenet64.pt*"):
        p.unlink()
    k = int(frac * len(data))
    server.cut[spath] = k
    with pytest.raises(CMError, match=f"stopped at {k} of {len(data)} bytes"):
        hub.resolve("ct_imagenet64")
    assert not where.exists()
    assert hub.resolve("ct_imagenet64").read_bytes() == data
    assert server.log[-1] == (spath, f"bytes={k}-" if k else None, len(data) - k)
    assert hub.recorded_sha256(where) == sha(data)


def test_concurrent_first_uses_download_once(server):
    data = b"w" * 50000
    spath, where = serve(server, "cd_imagenet64_lpips", data)
    server.delay = 0.3
    got = []
    threads = [threading.Thread(target=lambda: got.append(hub.resolve("cd_imagenet64_lpips")))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [where] * 4 and where.read_bytes() == data and server.hits(spath) == 1


def test_a_partial_file_longer_than_the_file_starts_over(server):
    data = b"0123456789" * 50
    spath, where = serve(server, "cd_cat256_l2", data)
    where.parent.mkdir(parents=True)
    where.with_name(where.name + ".part").write_bytes(b"x" * 600)  # 416 from the server
    assert hub.resolve("cd_cat256_l2").read_bytes() == data


def test_a_corrupted_cache_file_is_detected_and_fetched_again(server, capsys):
    data = b"released weights " * 4096
    spath, where = serve(server, "ct_bedroom256", data)
    hub.resolve("ct_bedroom256")
    bad = bytearray(data)
    bad[len(bad) // 3] ^= 1  # one bit, same size
    where.write_bytes(bytes(bad))
    assert hub.resolve("ct_bedroom256").read_bytes() == data
    assert server.hits(spath) == 2
    assert "does not match its recorded sha256" in capsys.readouterr().out
    where.with_name(where.name + ".sha256").write_text("not a checksum\n")  # an unreadable record: fetched
    assert hub.resolve("ct_bedroom256").read_bytes() == data and server.hits(spath) == 3
    where.write_bytes(bytes(bad))  # corrupt again, and no server: refused with one line
    server.close()
    with pytest.raises(CMError) as e:
        hub.resolve("ct_bedroom256")
    assert "\n" not in str(e.value) and str(where) in str(e.value)


def test_a_file_put_into_the_cache_by_hand_is_used_and_its_checksum_kept(server):
    data = b"by hand" * 100
    spath, where = serve(server, "cd_bedroom256_l2", b"other")
    where.parent.mkdir(parents=True)
    where.write_bytes(data)
    assert hub.resolve("cd_bedroom256_l2") == where and server.hits(spath) == 0
    assert where.with_name(where.name + ".sha256").read_text().split()[0] == sha(data)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_server_gives_one_line_with_the_url_and_the_cache_path(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(hub.MIRROR_ENV, f"http://127.0.0.1:{closed_port()}")
    url = f"https://{CM_HOST}/consistency/ct_imagenet64.pt"
    where = tmp_path / "cache" / "weights" / CM_HOST / "consistency" / "ct_imagenet64.pt"
    with pytest.raises(CMError) as e:
        hub.resolve("ct_imagenet64")
    assert "\n" not in str(e.value) and url in str(e.value) and str(where) in str(e.value), e.value
    with pytest.raises(SystemExit) as ex:
        full.sample.main(["--checkpoint", "ct_imagenet64", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert ex.value.code == 1 and "\n" not in err and url in err and str(where) in err, err
    assert not where.exists()


# ----------------------------------------------------------------------------------------------
# Names, paths, mirrors, the listing


def test_paths_names_and_unknown_names(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("cd-lpips").write_bytes(b"a local file")  # a path that exists wins over the name
    assert hub.resolve("cd-lpips") == Path("cd-lpips") and server.log == []
    with pytest.raises(CMError) as e:
        hub.resolve("cd_imagenet64_l3")
    assert "\n" not in str(e.value) and "cd_imagenet64_l2" in str(e.value)
    assert hub.resolve("runs/x/ckpt-0000001.pt") == Path("runs/x/ckpt-0000001.pt")  # a missing path
    with pytest.raises(CMError, match="no checkpoint at runs/x"):
        checkpoints.load("runs/x/ckpt-0000001.pt")
    assert server.log == []


def test_every_release_keeps_its_official_name_and_its_kind_reads_off_the_cache_path():
    from full.released import flax, guided_diffusion
    for name, r in hub.RELEASES.items():
        u = urllib.parse.urlsplit(r.url)
        assert u.scheme == "https" and u.hostname in (CM_HOST, EDM_HOST)
        path = hub.cache_path(r.url, "/c")
        assert path.as_posix() == f"/c/{u.hostname}{u.path}"
        base = u.path.rsplit("/", 1)[-1]
        assert hub.lookup(name) is r and hub.lookup(base) is (None if base.startswith("checkpoint_") else r)
        words = set(re.findall(r"[A-Za-z0-9]+", r.kind))
        want = "edm" if "EDM" in words else "ct" if "CT" in words else "cd"
        if r.url.endswith(".pt"):
            assert guided_diffusion.infer_kind(path) == want
        elif "jcm_checkpoints" in r.url:
            assert flax._path_word(path, flax.KINDS) == want
            assert hub.lookup(r.url.split("jcm_checkpoints/")[1]) is r


def test_default_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("CM_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub.cache_root() == tmp_path / ".cache" / "consistency-models" / "weights"


SEG = st.text("abcdefghijklmnopqrstuvwxyz0123456789_-.", min_size=1, max_size=12).filter(lambda s: s not in
                                                                                          (".", ".."))
HOST = st.lists(st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=10), min_size=1,
                max_size=4).map(".".join)


@given(host=HOST, segs=st.lists(SEG, min_size=1, max_size=5), mhost=HOST, port=st.integers(1, 65535),
       prefix=st.lists(SEG, max_size=3), slash=st.booleans(), scheme=st.sampled_from(["http", "https"]))
def test_mirror_url_maps_host_and_path_under_the_mirror(host, segs, mhost, port, prefix, slash, scheme):
    url = f"https://{host}/{'/'.join(segs)}"
    pre = "".join(f"/{p}" for p in prefix)
    mirror = f"{scheme}://{mhost}:{port}{pre}" + ("/" if slash else "")
    got = hub.mirror_url(url, mirror)
    assert got == f"{scheme}://{mhost}:{port}{pre}/{host}/{'/'.join(segs)}"
    u = urllib.parse.urlsplit(got)
    assert (u.hostname, u.port) == (mhost, port) and u.path.split("/")[1 + len(prefix):] == [host, *segs]
    assert hub.cache_path(url, "/c").parts[2:] == (host, *segs)  # the cache path ignores the mirror


@pytest.mark.parametrize("mirror", ["127.0.0.1:8000", "ftp://host/x", "http://", "http://h/?q=1"])
def test_a_bad_mirror_is_one_line(monkeypatch, mirror):
    monkeypatch.setenv(hub.MIRROR_ENV, mirror)
    with pytest.raises(CMError, match=hub.MIRROR_ENV):
        hub.source_url(hub.RELEASES["ct_cat256"].url)


def test_listing_names_every_release_with_its_kind_size_and_example(server, capsys):
    data = b"z" * 3000
    serve(server, "cd-l2", data)
    hub.resolve("cd-l2")
    capsys.readouterr()
    assert listing.main([]) == 0
    out = capsys.readouterr().out.splitlines()
    for name, r in hub.RELEASES.items():
        row = next(li for li in out if li.split()[0] == name)
        assert r.kind in row and f"python -m full.sample --checkpoint {name}" in row
        assert (f"{3000 / 1024:.1f} KiB" if name == "cd-l2" else "  ?  ") in row


def test_url_listing_gives_each_official_url_and_its_cache_path(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CM_CACHE", str(tmp_path))
    assert listing.main(["--urls"]) == 0
    rows = [li.split("  ") for li in capsys.readouterr().out.splitlines()]
    assert [r[0] for r in rows] == list(hub.RELEASES)
    for name, url, where in rows:
        u = urllib.parse.urlsplit(url)
        assert url == hub.RELEASES[name].url and where == str(tmp_path / "weights" / u.hostname) + u.path
    assert listing.main(["--bogus"]) == 2 and "\n" not in capsys.readouterr().err.strip()


def test_an_unusable_cache_folder_is_one_line(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("CM_CACHE", str(tmp_path / "file"))  # a folder under a file cannot be made
    monkeypatch.setenv(hub.MIRROR_ENV, f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(CMError, match="cannot use the cache folder .*set CM_CACHE") as e:
        hub.resolve("cd-lpips")
    assert "\n" not in str(e.value)
