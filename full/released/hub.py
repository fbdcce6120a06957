"""Released weights by name: the official files, downloaded once into a cache and then read as local files.

    python -m full.sample --checkpoint cd_imagenet64_l2 --class-labels 145
    python -m full.train --preset cifar10-cd-lpips run.teacher=edm-cifar10-32x32-uncond-ve
    python -m full.released                      # every known name, its kind, size and an example

`resolve(name_or_path)` is what checkpoints.load opens: a path that exists is returned unchanged; a known
name (RELEASES, also with its file suffix or its path under the official base URL) is downloaded from its
official URL into `cache_dir() / "weights" / HOST / PATH` (cm.cache_dir: $CM_CACHE, else
~/.cache/consistency-models), so the file keeps its official name, from which the readers infer the kind.

Download: to `<file>.part`, renamed when its size equals the server's Content-Length; a `.part` left by an
interrupted download is continued with an HTTP Range request. The sha256 of the finished file is written
beside it (`<file>.sha256`, sha256sum's format) and checked whenever the cached file is used again: a file
that no longer matches is fetched again. A file put into the cache by hand (no .sha256 yet) is taken as it
is and its sha256 recorded. One lock file per download keeps concurrent processes (DDP ranks) from
writing the same file.

CM_WEIGHTS_MIRROR=http://host:port[/prefix] fetches `https://HOST/PATH` from `http://host:port[/prefix]/HOST/PATH`
instead (a mirror, an air-gapped site). Without network, one line names the URL and the cache path where
the file can be put by hand.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from cm import CMError, cache_dir
from full import dist

CM = "https://openaipublic.blob.core.windows.net/consistency/"  # openai/consistency_models README
JCM = CM + "jcm_checkpoints/"  # openai/consistency_models_cifar10 README
EDM = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"  # NVlabs/edm README
MIRROR_ENV = "CM_WEIGHTS_MIRROR"
TIMEOUT = 60.0  # seconds without a byte before a download is given up (and left to resume)
CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Release:
    name: str
    url: str
    kind: str  # what the file is, in words
    example: str  # a command that uses it
    size: int | None = None  # bytes, where known before downloading


def _cm(name: str, kind: str, args: str) -> Release:
    return Release(name, f"{CM}{name}.pt", kind, f"python -m full.sample --checkpoint {name} {args}".strip())


def _edm(name: str, kind: str, args: str) -> Release:
    return Release(name, f"{EDM}{name}.pkl", kind, f"python -m full.sample --checkpoint {name} {args}")


def _jcm(name: str, file: str, kind: str, args: str = "--num-samples 64") -> Release:
    return Release(name, f"{JCM}{file}", kind, f"python -m full.sample --checkpoint {name} {args}")


_HEUN40, _CD = "--sampler heun --steps 40", "CD student"
RELEASES: dict[str, Release] = {r.name: r for r in (
    # openai/consistency_models: raw guided-diffusion state dicts (full/released/guided_diffusion.py)
    _cm("edm_imagenet64_ema", "ImageNet-64 EDM teacher (.pt)", _HEUN40 + " --class-labels 145"),
    _cm("cd_imagenet64_l2", f"ImageNet-64 {_CD}, l2 (.pt)", "--class-labels 145"),
    _cm("cd_imagenet64_lpips", f"ImageNet-64 {_CD}, LPIPS (.pt)", "--ts 0,22,39 --grid-steps 40"),
    _cm("ct_imagenet64", "ImageNet-64 CT (.pt)", "--ts 0,106,200 --grid-steps 201"),
    _cm("edm_bedroom256_ema", "LSUN Bedroom-256 EDM teacher (.pt)", _HEUN40),
    _cm("cd_bedroom256_l2", f"LSUN Bedroom-256 {_CD}, l2 (.pt)", "--ts 0,18,39 --grid-steps 40"),
    _cm("cd_bedroom256_lpips", f"LSUN Bedroom-256 {_CD}, LPIPS (.pt)", "--ts 0,17,39 --grid-steps 40"),
    _cm("ct_bedroom256", "LSUN Bedroom-256 CT (.pt)", "--ts 0,67,150 --grid-steps 151"),
    _cm("edm_cat256_ema", "LSUN Cat-256 EDM teacher (.pt)", _HEUN40),
    _cm("cd_cat256_l2", f"LSUN Cat-256 {_CD}, l2 (.pt)", ""),
    _cm("cd_cat256_lpips", f"LSUN Cat-256 {_CD}, LPIPS (.pt)", ""),
    _cm("ct_cat256", "LSUN Cat-256 CT (.pt)", "--ts 0,62,150 --grid-steps 151"),
    # NVlabs/edm: persistence pickles, read without running them (full/released/edm_pickle.py)
    _edm("edm-cifar10-32x32-uncond-ve", "CIFAR-10 EDM VE + NCSN++ (.pkl)", "--sampler heun --steps 18"),
    _edm("edm-cifar10-32x32-uncond-vp", "CIFAR-10 EDM VP + DDPM++ (.pkl)", "--sampler heun --steps 18"),
    _edm("edm-cifar10-32x32-cond-vp", "CIFAR-10 EDM VP + DDPM++, 10 classes (.pkl)",
         "--sampler heun --steps 18 --class-labels 3"),
    # openai/consistency_models_cifar10: Flax msgpack files (full/released/flax.py)
    _jcm("edm_cifar10_ema", "edm_cifar10_ema", "CIFAR-10 EDM teacher (Flax)"),
    _jcm("cd-l1", "cd-l1/checkpoints/checkpoint_80", f"CIFAR-10 {_CD}, l1 (Flax)"),
    _jcm("cd-l2", "cd-l2/checkpoints/checkpoint_80", f"CIFAR-10 {_CD}, l2 (Flax)"),
    _jcm("cd-lpips", "cd-lpips/checkpoints/checkpoint_80", f"CIFAR-10 {_CD}, LPIPS (Flax)",
         "--ts 0,11,17 --grid-steps 18"),
    _jcm("ct-lpips", "ct-lpips/checkpoints/checkpoint_74", "CIFAR-10 CT, LPIPS (Flax)"),
    _jcm("cifar10-continuous-cd-l2", "cifar10-continuous-cd-l2/checkpoints/checkpoint_40",
         "CIFAR-10 continuous-time CD, l2 (Flax)"),
    _jcm("cifar10-continuous-cd-l2-stopgrad", "cifar10-continuous-cd-l2-stopgrad/checkpoints/checkpoint_40",
         "CIFAR-10 continuous-time CD, l2, stopgrad (Flax)"),
    _jcm("cifar10-continuous-cd-lpips-stopgrad",
         "cifar10-continuous-cd-lpips-stopgrad/checkpoints/checkpoint_40",
         "CIFAR-10 continuous-time CD, LPIPS, stopgrad (Flax)"),
    _jcm("continuous-ct-l2", "continuous-ct-l2/checkpoints/checkpoint_80",
         "CIFAR-10 continuous-time CT, l2 (Flax)"),
    _jcm("continuous-ct-lpips", "continuous-ct-lpips/checkpoints/checkpoint_40",
         "CIFAR-10 continuous-time CT, LPIPS (Flax)"),
)}


def _aliases() -> dict[str, Release]:
    """Every spelling of a name: the name, its file name (`cd_imagenet64_l2.pt`) and its path under the
    official base (`cd-lpips/checkpoints/checkpoint_80`)."""
    out = {}
    for r in RELEASES.values():
        rel = next(r.url[len(b):] for b in (JCM, CM, EDM) if r.url.startswith(b))
        for a in (r.name, rel, r.name if r.url.startswith(JCM) else rel.rsplit("/", 1)[-1]):
            out.setdefault(a, r)
    return out


def lookup(name: str) -> Release | None:
    return _aliases().get(str(name).strip())


# --------------------------------------------------------------------------------------------------------
# URLs and cache paths
# --------------------------------------------------------------------------------------------------------


def cache_root() -> Path:
    return cache_dir() / "weights"


def cache_path(url: str, root: str | os.PathLike | None = None) -> Path:
    """Where `url` is cached: <root>/HOST/PATH (root: cache_root())."""
    u = urllib.parse.urlsplit(url)
    parts = [p for p in u.path.split("/") if p]
    if not u.hostname or not parts or any(p in (".", "..") for p in parts):
        raise CMError(f"not a file URL: {url}")
    return Path(root if root is not None else cache_root(), u.hostname, *parts)


def mirror_url(url: str, mirror: str) -> str:
    """https://HOST/PATH -> MIRROR/HOST/PATH (MIRROR = http[s]://host[:port][/prefix], no query)."""
    m = urllib.parse.urlsplit(mirror)
    if m.scheme not in ("http", "https") or not m.netloc or m.query or m.fragment:
        raise CMError(f"{MIRROR_ENV}={mirror!r} is not an http(s)://host[:port][/prefix] URL")
    u = urllib.parse.urlsplit(url)
    return f"{m.scheme}://{m.netloc}{m.path.rstrip('/')}/{u.netloc}{u.path}"


def source_url(url: str) -> str:
    """The URL actually fetched: the official one, or its mirror under $CM_WEIGHTS_MIRROR."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    return mirror_url(url, mirror) if mirror else url


# --------------------------------------------------------------------------------------------------------
# Resolving and downloading
# --------------------------------------------------------------------------------------------------------


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A path that exists -> unchanged; a released name -> its cached file (downloaded first if need be);
    anything else -> unchanged when it looks like a path (the reader then says it is missing), or a one-line
    CMError listing the close names."""
    path = Path(name_or_path)
    if path.exists():
        return path
    release = lookup(str(name_or_path))
    if release is not None:
        return fetch(release)
    text = str(name_or_path)
    close = difflib.get_close_matches(text, list(RELEASES), n=4, cutoff=0.6)
    if close and "/" not in text and os.sep not in text:
        raise CMError(f"no checkpoint at {text}, nor a released name; close names: {', '.join(close)} "
                      "(python -m full.released lists them all)")
    return path


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _sidecar(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def recorded_sha256(dest: Path) -> str | None:
    """The sha256 recorded beside dest; None without a record, '' for an unreadable one (matches nothing)."""
    side = _sidecar(dest)
    if not side.exists():
        return None
    try:
        word = (side.read_text(errors="replace").split() or [""])[0].lower()
    except OSError:
        return ""
    return word if len(word) == 64 and all(c in "0123456789abcdef" for c in word) else ""


def _record(dest: Path, digest: str) -> None:
    tmp = dest.with_name(dest.name + ".sha256.tmp")
    tmp.write_text(f"{digest}  {dest.name}\n")
    os.replace(tmp, _sidecar(dest))


@contextmanager
def _locked(dest: Path):
    """An exclusive lock on <file>.lock (POSIX flock; no lock where there is none)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    try:
        fh = open(dest.with_name(dest.name + ".lock"), "a")
    except OSError:  # a read-only cache: nothing will be written to it either
        yield
        return
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def by_hand(release: Release, dest: Path) -> str:
    return f"download {release.url} by hand and put it at {dest}"


def fetch(release: Release, root: str | os.PathLike | None = None) -> Path:
    """The cached file of `release`, verified against its recorded sha256, downloaded when absent or bad."""
    dest = cache_path(release.url, root)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        return _fetch_locked(release, dest)
    except OSError as e:  # a read-only or full cache
        raise CMError(f"cannot use the cache folder {dest.parent}: {e.strerror or e}; "
                      f"set CM_CACHE to a writable folder") from None


def _fetch_locked(release: Release, dest: Path) -> Path:
    with _locked(dest):
        if dest.is_file():
            want, got = recorded_sha256(dest), sha256_of(dest)
            if want is None:  # put there by hand: taken as it is, its checksum kept from now on
                try:
                    _record(dest, got)
                except OSError:  # a read-only cache
                    pass
                dist.print0(f"{release.name}: using {dest} as found (no checksum recorded yet; its sha256 "
                            f"{got[:16]}... is kept from now on)")
                return dest
            if want == got:
                return dest
            dist.print0(f"{release.name}: {dest} does not match its recorded sha256 ({got[:16]}... != "
                        f"{want[:16]}...): downloading it again")
            dest.unlink()
        digest = _download(release, dest)
        _record(dest, digest)
    return dest


def _content_range(value: str | None) -> tuple[int, int | None] | None:
    """'bytes START-END/TOTAL' -> (START, TOTAL or None for '*'); None if unreadable."""
    try:
        unit, rest = value.split(" ", 1)
        span, total = rest.split("/", 1)
        start = int(span.split("-", 1)[0])
        return (start, None if total.strip() == "*" else int(total)) if unit == "bytes" else None
    except (AttributeError, ValueError):
        return None


def _download(release: Release, dest: Path) -> str:
    """Download to <dest>.part (resumed with Range if it exists), check its size, rename it to dest; return
    the sha256 of the finished file."""
    src, part = source_url(release.url), dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": "consistency-models", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    via = "" if src == release.url else f" (via {src})"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(src, headers=headers), timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the partial file is not a prefix of this one: start again
            part.unlink()
            return _download(release, dest)
        raise CMError(f"cannot download {release.name}: HTTP {e.code} {e.reason}{via}; "
                      f"{by_hand(release, dest)}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
        why = getattr(e, "reason", None) or e
        raise CMError(f"cannot download {release.name} (no network? {str(why)[:80]}){via}; "
                      f"{by_hand(release, dest)}") from None
    h = hashlib.sha256()
    with resp:
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        span = _content_range(resp.headers.get("Content-Range")) if resp.status == 206 else None
        if span is not None and span[0] == have:  # the server continues the partial file
            total = span[1] if span[1] is not None else (have + length if length is not None else None)
            with open(part, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    h.update(chunk)
            mode = "ab"
        elif resp.status == 200:  # the whole file (a server without Range support starts over)
            have, total, mode = 0, length, "wb"
        elif resp.status == 206 and have:  # another range than asked for: start again from the first byte
            part.unlink()
            resp.close()
            return _download(release, dest)
        else:
            raise CMError(f"cannot download {release.name}: unexpected HTTP {resp.status} "
                          f"{resp.headers.get('Content-Range', '')}{via}; {by_hand(release, dest)}")
        cut = ""
        from tqdm import tqdm
        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=release.name,
                   disable=dist.rank() != 0, mininterval=0.5, file=sys.stderr)
        with open(part, mode) as fh, bar:
            try:
                while chunk := resp.read(CHUNK):
                    fh.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as e:  # cut off, timed out: the part is kept
                cut = f": {type(e).__name__} {str(e)[:60]}".rstrip()
    size = part.stat().st_size
    if cut or (total is not None and size != total):
        of = f" of {total}" if total is not None else ""
        raise CMError(f"download of {release.name} stopped at {size}{of} bytes{cut}{via}; run the command "
                      f"again to resume it ({part})")
    os.replace(part, dest)
    return h.hexdigest()


def cached_size(release: Release, root: str | os.PathLike | None = None) -> int | None:
    """The size of the cached file, or the known size, or None."""
    dest = cache_path(release.url, root)
    return dest.stat().st_size if dest.is_file() else release.size
