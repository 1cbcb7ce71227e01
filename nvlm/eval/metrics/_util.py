"""Helpers shared by the scorers: the profile check and the edit distance."""

from __future__ import annotations

PROFILES = ("official", "nvlm")


def check_profile(profile: str) -> str:
    """Return ``profile`` if it is one of ``PROFILES``; raise ``ValueError`` otherwise."""
    if profile not in PROFILES:
        raise ValueError(f"unknown scoring profile {profile!r}; expected one of {PROFILES}")
    return profile


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1), one DP row at a time."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev_diag, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            cur = min(row[j] + 1, row[j - 1] + 1, prev_diag + (ca != cb))
            prev_diag, row[j] = row[j], cur
    return row[-1]
