"""Checks of the recording's values before any heavy work: what looks wrong, said plainly.

A wrong dtype, gain or channel count tends to give white noise and then a cryptic clustering error much later
(MouseLand/Kilosort#1036); these checks look at a few short windows spread over the sorted range first.
"""

from __future__ import annotations

import logging

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


def check_recording_values(recording, t_start: int, t_stop: int):
    windows = sample_windows(recording, t_start, t_stop)
    for start, traces in windows:
        check_finite(traces, start)
    data = np.concatenate([w for _, w in windows]).astype(np.float32)
    every_4th = data[::4]  # 12000 samples per channel are plenty for a median, and 4x faster
    spread = np.median(np.abs(every_4th - np.median(every_4th, axis=0)), axis=0)  # per-channel MAD
    if not (data.max(axis=0) > data.min(axis=0)).any():
        raise ValueError("every channel of the recording is constant in the sampled windows: nothing to sort "
                         "(is this the right file, dtype and channel count?)")
    dtype = np.dtype(recording.get_dtype())
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        clipped = np.mean((data <= info.min) | (data >= info.max))
        if clipped > 1e-5:
            logger.warning("%.3f%% of the sampled %s values sit at the type's limits (clipped)", 100 * clipped, dtype)
        if clipped > 1e-3:
            raise ValueError(
                f"{100 * clipped:.1f}% of the sampled {dtype} values sit at the type's limits: the signal is "
                "clipped (the gain applied before the conversion to integers was too large); rescale it before "
                "converting, or sort the float recording"
            )
        if np.median(spread) < 1:
            raise ValueError(
                f"the sampled {dtype} values vary by less than one integer step on most channels (median absolute "
                f"deviation {np.median(spread):.2f}): the signal vanished in the conversion to integers (the gain "
                "was too small); sort the recording before the conversion, or scale it up"
            )
