"""Checks of the recording's values before any heavy work: what looks wrong, said plainly.

A wrong dtype, gain or channel count tends to give white noise and then a cryptic clustering error much later
(MouseLand/Kilosort#1036); these checks look at a few short windows spread over the sorted range first.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

logger = logging.getLogger("si_ks2py")

N_WINDOWS = 16
WINDOW = 3000  # samples (0.1 s at 30 kHz)


def sample_windows(recording, t_start: int, t_stop: int) -> list[tuple[int, np.ndarray]]:
    """(start sample, traces) of N_WINDOWS windows spread over [t_start, t_stop), raw values."""
    starts = np.unique(np.linspace(t_start, max(t_start, t_stop - WINDOW), N_WINDOWS).astype(int))
    return [(int(s), recording.get_traces(segment_index=0, start_frame=int(s), end_frame=int(min(t_stop, s + WINDOW)),
                                          return_in_uV=False)) for s in starts]


def check_finite(traces: np.ndarray, first_sample: int):
    """ValueError naming the first NaN or inf (sample, channel index)."""
    bad = ~np.isfinite(traces)
    if bad.any():
        t, c = np.argwhere(bad)[0]
        raise ValueError(
            f"the recording holds NaN or infinite values (first at sample {first_sample + int(t)}, channel index "
            f"{int(c)}): remove or interpolate them first (e.g. spikeinterface.preprocessing.remove_artifacts or "
            "a frame_slice that leaves them out)"
        )


def every_4th_by_channel(windows: list[np.ndarray]) -> np.ndarray:
    """[Nchan, n] float32: every 4th sample of the windows [n_i, Nchan] laid end to end, one row per channel.

    Medians are much faster along rows than down the time axis, and transposing window by window keeps the
    copies in the cache (a transposed copy of the whole cost ten times more)."""
    offsets = np.cumsum([0] + [len(w) for w in windows[:-1]])  # where each window starts, end to end
    parts = [w[-offset % 4::4].T for offset, w in zip(offsets, windows)]
    rows = np.empty((windows[0].shape[1], sum(part.shape[1] for part in parts)), dtype=np.float32)  # C order
    return np.concatenate(parts, axis=1, out=rows)


def row_medians(rows: np.ndarray) -> np.ndarray:
    """np.median(rows, axis=1) of rows [m, n], the rows shared among threads (the partition releases the GIL)."""
    n_workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        blocks = np.array_split(rows, n_workers)
        return np.concatenate(list(pool.map(lambda block: np.median(block, axis=1), blocks)))


def check_recording_values(recording, t_start: int, t_stop: int):
    windows = sample_windows(recording, t_start, t_stop)
    for start, traces in windows:
        check_finite(traces, start)
    data = np.concatenate([w for _, w in windows]).astype(np.float32)
    if not (data.max(axis=0) > data.min(axis=0)).any():
        raise ValueError("every channel of the recording is constant in the sampled windows: nothing to sort "
                         "(is this the right file, dtype and channel count?)")
    dtype = np.dtype(recording.get_dtype())
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        clipped = (np.count_nonzero(data <= info.min) + np.count_nonzero(data >= info.max)) / data.size
        if clipped > 1e-5:
            logger.warning("%.3f%% of the sampled %s values sit at the type's limits (clipped)", 100 * clipped, dtype)
        if clipped > 1e-3:
            raise ValueError(
                f"{100 * clipped:.1f}% of the sampled {dtype} values sit at the type's limits: the signal is "
                "clipped (the gain applied before the conversion to integers was too large); rescale it before "
                "converting, or sort the float recording"
            )
        # per-channel median absolute deviation; 12000 samples per channel are plenty for a median
        every_4th = every_4th_by_channel([w for _, w in windows])
        spread = row_medians(np.abs(every_4th - row_medians(every_4th)[:, None]))
        if np.median(spread) < 1:
            raise ValueError(
                f"the sampled {dtype} values vary by less than one integer step on most channels (median absolute "
                f"deviation {np.median(spread):.2f}): the signal vanished in the conversion to integers (the gain "
                "was too small); sort the recording before the conversion, or scale it up"
            )
