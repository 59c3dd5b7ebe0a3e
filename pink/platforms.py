"""Can any runner run this image? Its platform and CUDA need, against the runners'.

An arm64 image on x86 servers, or a CUDA 12.4 image on drivers that stop at
12.2, would wait its turn and then fail on every runner. Runners report
their platform (Docker's) and, with NVML, their driver and the newest CUDA it
supports; an image says its platform in its config, and its CUDA need in
NVIDIA_REQUIRE_CUDA (read as the NVIDIA container toolkit reads it: a
`cuda>=X.Y`, or a driver range a datacenter GPU's forward compatibility
allows) or else CUDA_VERSION. A submit no reporting runner can serve is
refused at once, naming both sides. What nobody reported is never held
against an image: a runner without NVML knows no CUDA version, one of an
older PINK no platform, and an empty cluster refuses nothing (its runners
may all be restarting).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}  # uname -> Go's
_NAME = re.compile(r"[a-z0-9._-]{1,32}", re.ASCII)  # one part of a platform as an image may name it
_NUMBERS = re.compile(r"[0-9]{1,6}(?:\.[0-9]{1,6}){0,3}", re.ASCII)  # "12.4", "535.104.05"
_CONDITION = re.compile(r"(cuda|driver|brand|arch)(>=|<=|=|>|<)([A-Za-z0-9._-]{1,32})", re.ASCII)
MAX_TERMS = 32  # alternatives, and conditions in one, read from NVIDIA_REQUIRE_CUDA
Condition = tuple[str, str, str]  # (cuda | driver | brand | arch, operator, value)


@dataclass(frozen=True)
class Needs:
    """What an image asks of a runner: `platform` "os/arch", and for its
    GPUs the alternatives of NVIDIA_REQUIRE_CUDA (space-separated terms are
    alternatives, comma-separated conditions must all hold, as the NVIDIA
    container toolkit reads them); empty where the image is silent."""

    platform: str | None = None
    cuda: tuple[tuple[Condition, ...], ...] = ()

    @property
    def cuda_shown(self) -> str | None:
        """The least CUDA version any alternative names: what people read."""
        named = [numbers(v) for alt in self.cuda for k, op, v in alt if k == "cuda" and op in (">=", ">", "=")]
        return ".".join(map(str, min(named))) if named and None not in named else None

    def to_json(self) -> dict:
        return {"platform": self.platform, "cuda": self.cuda_shown}


def of_config(config: dict) -> Needs:
    """The needs an image config states (its `os`, `architecture` and env);
    anything of the wrong shape or size states nothing."""
    arch, os_name = config.get("architecture"), config.get("os")
    platform = f"{os_name}/{arch}" if all(isinstance(x, str) and _NAME.fullmatch(x) for x in (arch, os_name)) \
        else None
    env = _env(config)
    if env.get("NVIDIA_DISABLE_REQUIRE", "").lower() in ("1", "true", "yes"):
        return Needs(platform)
    required = env.get("NVIDIA_REQUIRE_CUDA", "")
    if not required.strip() and numbers(env.get("CUDA_VERSION")):
        major_minor = ".".join(env["CUDA_VERSION"].strip().split(".")[:2])
        required = f"cuda>={major_minor}"
    return Needs(platform, _alternatives(required))


def _alternatives(text: str) -> tuple[tuple[Condition, ...], ...]:
    found = []
    for term in text.split()[:MAX_TERMS]:
        conditions = tuple(m.groups() for part in term.split(",")[:MAX_TERMS]
                           if (m := _CONDITION.fullmatch(part)))
        if conditions:
            found.append(conditions)
    return tuple(found)


def _env(config: dict) -> dict[str, str]:
    inner = config.get("config") if isinstance(config.get("config"), dict) else {}
    pairs = inner.get("Env") if isinstance(inner.get("Env"), list) else []
    return dict(p.split("=", 1) for p in pairs if isinstance(p, str) and "=" in p)


def numbers(text) -> tuple[int, ...] | None:
    """(12, 4) of "12.4", (535, 104, 5) of "535.104.05"; None when it is none."""
    if not isinstance(text, str) or not _NUMBERS.fullmatch(text.strip()):
        return None
    return tuple(int(x) for x in text.strip().split("."))


def platform_of(os_type: str | None, machine: str | None) -> str | None:
    """Docker's `info` (OSType, Architecture: uname's) as an image names it: linux/amd64."""
    if not os_type or not machine:
        return None
    return f"{os_type}/{ARCHITECTURES.get(machine, machine)}"


def _holds(have: tuple[int, ...], op: str, want: tuple[int, ...]) -> bool:
    width = max(len(have), len(want))
    a, b = have + (0,) * (width - len(have)), want + (0,) * (width - len(want))
    return {">=": a >= b, "<=": a <= b, "=": a == b, ">": a > b, "<": a < b}[op]


def _meets(runner: dict, conditions: tuple[Condition, ...]) -> bool | None:
    """Does the runner meet every condition? None where it did not report what one asks."""
    for key, op, value in conditions:
        if key in ("brand", "arch"):
            continue  # runners report neither: never held against the image
        have, want = numbers(runner.get(key)), numbers(value)
        if have is None or want is None:
            return None
        if not _holds(have, op, want):
            return False
    return True


def runs_on(needs: Needs, runner: dict) -> bool | None:
    """Can the runner give the image's GPUs what they need? None: it cannot tell."""
    if not needs.cuda:
        return True
    answers = [_meets(runner, alternative) for alternative in needs.cuda]
    return True if True in answers else None if None in answers else False


def same_platform(needs: Needs, runner: dict) -> bool:
    """Might the runner run the image's platform? (One that did not say might.)"""
    return not needs.platform or runner.get("platform") in (None, needs.platform)


def refusal(needs: Needs, gpus: int, runners: list[dict]) -> str | None:
    """Why no runner in `runners` (their registered records) can run the
    image, or None. Only what the runners reported counts."""
    platforms = {r.get("platform") for r in runners}
    if needs.platform and runners and None not in platforms and needs.platform not in platforms:
        return (f"the image is built for {needs.platform}; the GPU servers run {', '.join(sorted(platforms))}: "
                f"build it for theirs (docker buildx build --platform {min(platforms)})")
    if not needs.cuda or not gpus:
        return None  # without GPUs the driver is never checked
    serving = [r for r in runners if len(r.get("gpus") or []) >= gpus and same_platform(needs, r)]
    if not serving or any(runs_on(needs, r) is not False for r in serving):
        return None
    newest = max(serving, key=lambda r: numbers(r.get("cuda")) or ())
    return (f"the image needs CUDA {needs.cuda_shown or 'of another driver'} (its NVIDIA_REQUIRE_CUDA or "
            f"CUDA_VERSION); the newest driver on the GPU servers with {gpus} GPU(s) is "
            f"{newest.get('driver') or 'unknown'}, which supports CUDA {newest.get('cuda')}: build the image on a "
            f"CUDA {newest.get('cuda')} base, or ask an admin to update the drivers")
