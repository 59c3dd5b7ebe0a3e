"""Can any runner run this image? Its platform and CUDA need, against the runners'.

An arm64 image on x86 servers, or a CUDA 12.4 image on drivers that stop at
12.2, would wait its turn and then fail on every runner. Runners report
their platform (Docker's) and, with NVML, their driver and the newest CUDA it
supports; an image says its platform in its config, and its CUDA need in
NVIDIA_REQUIRE_CUDA (the `cuda>=X.Y` the NVIDIA container toolkit checks) or
else CUDA_VERSION. A submit no reporting runner can serve is refused at once,
naming both sides. What nobody reported is never held against an image: a
runner without NVML knows no CUDA version, and an empty cluster refuses
nothing (its runners may all be restarting).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}  # uname -> Go's
_REQUIRE_CUDA = re.compile(r"(?:^|\s)cuda>=(\d+)\.(\d+)")
_VERSION = re.compile(r"^(\d+)\.(\d+)")


@dataclass(frozen=True)
class Needs:
    """What an image asks of a runner: `platform` "os/arch" and the CUDA
    (major, minor) its driver must support; None where the image is silent."""

    platform: str | None = None
    cuda: tuple[int, int] | None = None

    def to_json(self) -> dict:
        return {"platform": self.platform, "cuda": version_text(self.cuda)}


def of_config(config: dict) -> Needs:
    """The needs an image config states (its `os`, `architecture` and env)."""
    arch, os_name = config.get("architecture"), config.get("os")
    platform = f"{os_name}/{arch}" if isinstance(arch, str) and isinstance(os_name, str) and arch else None
    env = _env(config)
    if env.get("NVIDIA_DISABLE_REQUIRE", "").lower() in ("1", "true", "yes"):
        return Needs(platform)
    m = _REQUIRE_CUDA.search(env.get("NVIDIA_REQUIRE_CUDA", ""))
    return Needs(platform, (int(m.group(1)), int(m.group(2))) if m else version(env.get("CUDA_VERSION")))


def _env(config: dict) -> dict[str, str]:
    inner = config.get("config") if isinstance(config.get("config"), dict) else {}
    pairs = inner.get("Env") if isinstance(inner.get("Env"), list) else []
    return dict(p.split("=", 1) for p in pairs if isinstance(p, str) and "=" in p)


def version(text) -> tuple[int, int] | None:
    """(major, minor) of "12.2", "12.2.0" or "12"; None when it is none."""
    if not isinstance(text, str):
        return None
    m = _VERSION.match(text.strip())
    return (int(m.group(1)), int(m.group(2))) if m else None


def version_text(v: tuple[int, int] | None) -> str | None:
    return f"{v[0]}.{v[1]}" if v else None


def platform_of(os_type: str, machine: str) -> str:
    """Docker's `info` (OSType, Architecture: uname's) as an image names it: linux/amd64."""
    return f"{os_type}/{ARCHITECTURES.get(machine, machine)}"


def refusal(needs: Needs, gpus: int, runners: list[dict]) -> str | None:
    """Why no runner in `runners` (their registered records) can run the
    image, or None. Only what the runners reported counts."""
    platforms = {r["platform"] for r in runners if r.get("platform")}
    if needs.platform and platforms and needs.platform not in platforms:
        return (f"the image is built for {needs.platform}; the GPU servers run {', '.join(sorted(platforms))}: "
                f"build it for theirs (docker buildx build --platform {min(platforms)})")
    if not needs.cuda or not gpus:
        return None  # without GPUs the driver's CUDA is never checked
    serving = [r for r in runners if len(r.get("gpus") or []) >= gpus and
               (not needs.platform or r.get("platform") in (None, needs.platform))]
    known = [(version(r.get("cuda")), r.get("driver")) for r in serving]
    if not known or any(v is None for v, _ in known):
        return None  # a runner that did not say might serve it
    newest, driver = max(known, key=lambda k: k[0])
    if newest >= needs.cuda:
        return None
    return (f"the image needs CUDA {version_text(needs.cuda)} (NVIDIA_REQUIRE_CUDA or CUDA_VERSION); the newest "
            f"driver on the GPU servers with {gpus} GPU(s) is {driver or 'unknown'}, which supports CUDA "
            f"{version_text(newest)}: build the image on a CUDA {version_text(newest)} base, or ask an admin to "
            "update the drivers")
