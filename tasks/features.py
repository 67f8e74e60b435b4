"""Log-mel filterbank features in PyTorch (Kaldi-style framing, HTK mel scale) and delta features.

Conventions (chosen to match Kaldi's ``compute-fbank-feats`` defaults, without dither):
  * frames of ``frame_length_ms`` (25 ms) every ``frame_shift_ms`` (10 ms); only whole frames (Kaldi's
    ``snip_edges=true``): ``1 + (N - win) // hop`` frames;
  * per frame: remove the DC offset, pre-emphasis ``x[i] -= 0.97 x[i-1]`` (``x[0] -= 0.97 x[0]``), Hamming window,
    zero-pad to the next power of two, power spectrum ``|FFT|^2``;
  * ``n_mels`` triangular filters equally spaced on the HTK mel scale ``mel(f) = 1127 ln(1 + f / 700)`` between
    ``low_freq`` and ``high_freq`` (0 = Nyquist), the triangles drawn in the mel domain (as Kaldi does);
  * ``log(max(energy, eps))``.
The test (tests/test_asr.py) checks this against an independent numpy per-frame DFT implementation.
"""
from __future__ import annotations

import math

import torch


def mel(f):
    return 1127.0 * torch.log1p(torch.as_tensor(f, dtype=torch.float64) / 700.0)


def mel_filters(n_mels: int, n_fft: int, sample_rate: int, low_freq: float = 20.0,
                high_freq: float = 0.0) -> torch.Tensor:
    """(n_fft // 2 + 1, n_mels) triangular filter weights, float64."""
    nyquist = sample_rate / 2
    high = high_freq if high_freq > 0 else nyquist + high_freq
    if not 0 <= low_freq < high <= nyquist:
        raise ValueError(f"need 0 <= low_freq < high_freq <= sample_rate/2, got low_freq={low_freq}, "
                         f"high_freq={high} at sample_rate={sample_rate}")
    edges = torch.linspace(float(mel(low_freq)), float(mel(high)), n_mels + 2, dtype=torch.float64)
    left, center, right = edges[:-2], edges[1:-1], edges[2:]
    bins = mel(torch.arange(n_fft // 2 + 1, dtype=torch.float64) * sample_rate / n_fft)[:, None]
    up = (bins - left) / (center - left)
    down = (right - bins) / (right - center)
    return torch.clamp(torch.minimum(up, down), min=0.0)


def fbank(wave: torch.Tensor, sample_rate: int, n_mels: int = 40, frame_length_ms: float = 25.0,
          frame_shift_ms: float = 10.0, preemphasis: float = 0.97, low_freq: float = 20.0, high_freq: float = 0.0,
          eps: float = 1e-10) -> torch.Tensor:
    """wave (N,) float (any scale; 16-bit PCM is usually given as integers in float) -> (T, n_mels) log-mel."""
    if wave.dim() != 1:
        raise ValueError(f"fbank takes one channel (N,), got shape {tuple(wave.shape)}")
    wave = wave.to(torch.float64)
    win = int(round(sample_rate * frame_length_ms / 1000))
    hop = int(round(sample_rate * frame_shift_ms / 1000))
    n_fft = 1 << (win - 1).bit_length()
    if wave.numel() < win:
        return torch.zeros(0, n_mels, dtype=torch.float32)
    frames = wave.unfold(0, win, hop)                      # (T, win)
    frames = frames - frames.mean(1, keepdim=True)
    if preemphasis:
        prev = torch.cat([frames[:, :1], frames[:, :-1]], 1)
        frames = frames - preemphasis * prev
    frames = frames * torch.hamming_window(win, periodic=False, dtype=torch.float64)
    power = torch.fft.rfft(frames, n=n_fft).abs() ** 2      # (T, n_fft/2 + 1)
    energies = power @ mel_filters(n_mels, n_fft, sample_rate, low_freq, high_freq)
    return torch.log(energies.clamp_min(eps)).to(torch.float32)


def deltas(feats: torch.Tensor, window: int = 2) -> torch.Tensor:
    """Regression deltas over +-window frames (edges repeat the first / last frame), as HTK and Kaldi compute them."""
    T = feats.shape[0]
    if T == 0:
        return feats.clone()
    padded = torch.cat([feats[:1].expand(window, -1), feats, feats[-1:].expand(window, -1)])
    num = sum(n * (padded[window + n: window + n + T] - padded[window - n: window - n + T])
              for n in range(1, window + 1))
    return num / (2 * sum(n * n for n in range(1, window + 1)))


def add_deltas(feats: torch.Tensor, order: int = 2, window: int = 2) -> torch.Tensor:
    """(T, F) -> (T, F * (order + 1)): the features, their deltas, delta-deltas, ..."""
    out = [feats]
    for _ in range(order):
        out.append(deltas(out[-1], window))
    return torch.cat(out, 1)


def n_frames(n_samples: int, sample_rate: int, frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0) -> int:
    win = int(round(sample_rate * frame_length_ms / 1000))
    hop = int(round(sample_rate * frame_shift_ms / 1000))
    return 0 if n_samples < win else 1 + (n_samples - win) // hop



def resample(wave: torch.Tensor, orig_rate: int, new_rate: int, zero_crossings: int = 16) -> torch.Tensor:
    """Band-limited resampling of (N,) float by the rational factor new/orig (Hann-windowed sinc, cut-off at the
    lower Nyquist rate). Output sample j sits at input time j * orig / new; with the ratio reduced to o/n there are
    only n distinct fractional offsets, so each gets its own FIR kernel and one strided conv1d computes all."""
    if orig_rate == new_rate:
        return wave
    g = math.gcd(int(orig_rate), int(new_rate))
    o, n = orig_rate // g, new_rate // g
    cutoff = min(o, n) / max(o, n) * 0.99                   # in units of the input Nyquist frequency ratio
    half = int(math.ceil(zero_crossings / cutoff))          # taps each side, in input samples
    x = wave.to(torch.float64)
    phases = torch.arange(n, dtype=torch.float64)
    starts = torch.floor(phases * o / n)                     # integer input index of each phase
    frac = phases * o / n - starts                            # fractional part: where between samples it falls
    taps = torch.arange(-half, half + o + 1, dtype=torch.float64)  # relative to the block's first input sample
    t = taps[None, :] - (starts + frac)[:, None]             # (n, K): distance of each tap to the output time
    window = torch.where(t.abs() <= half, 0.5 + 0.5 * torch.cos(math.pi * t / half), torch.zeros_like(t))
    kernel = cutoff * torch.special.sinc(cutoff * t) * window
    n_out = int(math.ceil(x.numel() * n / o))
    blocks = -(-n_out // n)
    padded = torch.nn.functional.pad(x, (half, half + o * (blocks + 1)))
    y = torch.nn.functional.conv1d(padded[None, None], kernel[:, None, :], stride=o)  # (1, n, blocks')
    return y[0, :, :blocks].T.reshape(-1)[:n_out].to(wave.dtype if wave.is_floating_point() else torch.float32)
