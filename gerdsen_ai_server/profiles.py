"""The server's profiles (``IMPETUS_PROFILE``): what each sets unless a setting is given, and what a
production bind beyond loopback requires. ``config.Settings`` applies them; docs/configuration.md
renders them."""

from __future__ import annotations

import ipaddress
from typing import Any, Literal

Profile = Literal["development", "production"]

# What each profile sets, unless the setting is given explicitly. Development is the plain defaults:
# a loopback server for one user. Production: logs a collector can parse, /health and /metrics behind
# the key (no host paths or PIDs for anonymous callers), a per-key request budget.
PROFILE_DEFAULTS: dict[str, dict[str, Any]] = {
    "development": {},
    "production": {"log_format": "json", "protect_health": True, "rate_limit": "600/minute"},
}
# What a profile requires of a bind beyond loopback (docs/configuration.md renders these): without it,
# a production server reachable from the network would serve anyone, or any DNS name (rebinding).
PROFILE_REQUIRES: dict[str, tuple[str, ...]] = {
    "development": (),
    "production": ("api_keys", "allowed_hosts"),
}


class ProfileError(RuntimeError):
    """The profile's requirements are not met: the server must not start (``impetus serve`` exits 2)."""


def is_loopback_host(host: str) -> bool:
    """Whether a bind address is reachable from this machine only (an empty or wildcard one is not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def profile_problems(settings: Any) -> list[str]:
    """What ``settings``' profile requires and its configuration lacks (empty: it may start)."""
    required = PROFILE_REQUIRES[settings.profile]
    if not required or is_loopback_host(settings.host):
        return []
    problems = []
    keys = [k for k in f"{settings.api_keys},{settings.admin_keys}".split(",") if k.strip()]
    if "api_keys" in required and not keys and settings.api_key_file is None:
        problems.append("no API key (set IMPETUS_API_KEYS, and IMPETUS_ADMIN_KEYS, or IMPETUS_API_KEY_FILE)")
    if "allowed_hosts" in required and not settings.allowed_host_list():
        problems.append(
            "no Host allow-list (set IMPETUS_ALLOWED_HOSTS to the names clients use, e.g. "
            "api.example.com; '*' answers to any name)"
        )
    return problems


def refusal(profile: str, host: str, problems: list[str]) -> str:
    """Why a profile refuses to start on ``host``, and the ways out."""
    return (
        f"IMPETUS_PROFILE={profile} refuses to start on {host or '(all addresses)'}, beyond "
        f"loopback: {'; '.join(problems)}. Or bind 127.0.0.1 (IMPETUS_HOST), or use IMPETUS_PROFILE=development."
    )
