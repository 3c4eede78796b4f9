"""The one progress bar of every long loop (scoring, validity checks, training): tqdm, off unless asked for."""
from __future__ import annotations


def bar(total: int, desc: str, unit: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, leave=True)
