"""What a run's weights depend on, in one place: the machine's decisions and the run's identity.

A `TrainConfig` says what to compute (`data`, `model`, `masksd`, `optim`, `seed`, `device`,
`threads`, `compile`) and where and how to execute it (`run`: output folder, loader workers,
overlays). Measured on one CPU (tiny RN, 2 epochs, sha256 of the weights): loader workers leave the
weights bit-identical, torch's CPU thread count does not (1 vs 2 threads differ, in fp32 and bf16),
and neither do the device, the precision or `torch.compile`. So the identity is the config without
`run`, with what the machine decides made explicit:

- the device type and the precision that actually ran (`optim.amp` is bf16 autocast only on CUDA
  and on CPUs with native bf16; AVX2-only CPUs train in fp32),
- the CPU thread count in effect (on the CPU only),
- the prepared data and the pretrained weights by content, not by path,
- the torch and open_clip versions.

A checkpoint resumes only a run with the same identity; the sweep names its Ray experiment after the
identities of its trials (`pipeline.identity`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from cmmasksd.config import TrainConfig
from cmmasksd.io.digest import file_sha256

# What each prepared split's manifest says about its content (paths are where it lies, not what it is).
_MANIFEST_CONTENT = ("format_version", "split", "size", "word_len", "tokenizer", "counts")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def native_bf16(device_type: str) -> bool:
    """bf16 autocast pays off: any CUDA device, or a CPU with native bf16 (avx512_bf16; AVX2 only emulates it)."""
    if device_type == "cuda":
        return True
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return device_type == "cpu" and check is not None and bool(check())


def precision(config: TrainConfig, device_type: str) -> str:
    """The precision a run trains in on this machine: "bf16" (autocast) or "fp32"."""
    return "bf16" if config.optim.amp and native_bf16(device_type) else "fp32"


def effective_threads(config: TrainConfig) -> int:
    """The CPU threads the run computes with: its setting, else torch's default on this machine."""
    return config.threads or torch.get_num_threads()


def runtime(config: TrainConfig, device_type: str | None = None) -> dict[str, Any]:
    """What this machine decides for `config`: device type, precision and (on the CPU) threads."""
    device_type = device_type or resolve_device(config.device).type
    decided: dict[str, Any] = {"device": device_type, "precision": precision(config, device_type)}
    if device_type == "cpu":
        decided["threads"] = effective_threads(config)
    return decided


def prepared_digest(prepared_dir: Path) -> str:
    """SHA-256 of the prepared splits' content as their manifests record it (annotation digests,
    settings, counts), wherever the folder lies."""
    digest = hashlib.sha256()
    for manifest_path in sorted(Path(prepared_dir).glob("*/manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        source = manifest.get("source", {})
        content = {key: manifest.get(key) for key in _MANIFEST_CONTENT}
        content["source"] = {"split_by": source.get("split_by"),
                             **{name: source.get(name, {}).get("sha256") for name in ("refs", "instances")}}
        digest.update(json.dumps(content, sort_keys=True).encode())
    return digest.hexdigest()


def weights_identity(pretrained: str | None) -> str | None:
    """A local weights file by its SHA-256; an open_clip tag ("openai") or None as it is."""
    if pretrained is not None and Path(pretrained).is_file():
        return f"sha256:{file_sha256(Path(pretrained))}"
    return pretrained


def run_identity(config: TrainConfig, device_type: str | None = None) -> dict[str, Any]:
    """Everything the weights of a run depend on: the config without `run`, data and weights by
    content, what the machine decides, and the library versions."""
    import open_clip

    identity = config.model_dump(mode="json", exclude={"run", "device", "threads"})
    identity["data"]["prepared_dir"] = f"sha256:{prepared_digest(config.data.prepared_dir)}"
    identity["model"]["pretrained"] = weights_identity(config.model.pretrained)
    identity["runtime"] = runtime(config, device_type)
    identity["versions"] = {"torch": str(torch.__version__), "open_clip": str(open_clip.__version__)}
    return identity


def digest(identity: dict[str, Any]) -> str:
    """A short, stable name for an identity (or any JSON-able mapping)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]


def differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys where two identities differ, with both values: what a refused resume names."""
    found = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return found
