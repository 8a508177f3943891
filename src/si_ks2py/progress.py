"""Progress bars (tqdm) that can be switched off."""

from __future__ import annotations

from tqdm.auto import tqdm


def progress_bar(total: int, desc: str, unit: str = "batch", enabled: bool = True):
    return tqdm(total=total, desc=f"{desc:>10}", unit=unit, disable=not enabled, leave=True, dynamic_ncols=True)
