"""A constant-velocity Kalman filter on boxes as (centre x, centre y, aspect ratio w/h, height), batched.

The same model and noise constants as ByteTrack's (and DeepSORT's) ``KalmanFilter``, but every call takes
arrays of N tracks at once (``mean`` [N, 8], ``cov`` [N, 8, 8]), so a frame with 20 objects costs a few
numpy calls instead of 20 small matrix products in Python: the node's budget is under a millisecond a frame.
Noise scales with the box height, so near and far objects are equally "sure".
"""

from __future__ import annotations

import numpy as np

_W_POS = 1.0 / 20  # position noise per unit of box height
_W_VEL = 1.0 / 160  # velocity noise per unit of box height
_F = np.eye(8)
_F[:4, 4:] = np.eye(4)  # x' = x + vx (one frame)
_H = np.eye(4, 8)  # we measure (x, y, a, h)


def xyxy_to_xyah(xyxy: np.ndarray) -> np.ndarray:
    out = np.empty((len(xyxy), 4))
    out[:, :2] = (xyxy[:, :2] + xyxy[:, 2:]) / 2
    out[:, 3] = np.maximum(xyxy[:, 3] - xyxy[:, 1], 1e-6)
    out[:, 2] = (xyxy[:, 2] - xyxy[:, 0]) / out[:, 3]
    return out


def xyah_to_xyxy(xyah: np.ndarray) -> np.ndarray:
    half = np.empty((len(xyah), 2))
    half[:, 0] = xyah[:, 2] * xyah[:, 3] / 2
    half[:, 1] = xyah[:, 3] / 2
    return np.concatenate([xyah[:, :2] - half, xyah[:, :2] + half], axis=1)


_DIAG = np.arange(8)


def _diag(std: np.ndarray) -> np.ndarray:
    """[N, k] standard deviations → [N, k, k] diagonal covariances."""
    n, k = std.shape
    out = np.zeros((n, k, k))
    out[:, _DIAG[:k], _DIAG[:k]] = std**2
    return out


def _add_diag(cov: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``cov + _diag(std)`` in place, without building the [N, k, k] zeros (adding 0.0 changes no number)."""
    k = std.shape[1]
    cov[:, _DIAG[:k], _DIAG[:k]] += std**2
    return cov


def initiate(xyah: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """New tracks from measurements [N, 4]: zero velocity, wide uncertainty."""
    h = xyah[:, 3]
    mean = np.concatenate([xyah, np.zeros_like(xyah)], axis=1)
    std = np.stack(
        [2 * _W_POS * h, 2 * _W_POS * h, np.full_like(h, 1e-2), 2 * _W_POS * h]
        + [10 * _W_VEL * h, 10 * _W_VEL * h, np.full_like(h, 1e-5), 10 * _W_VEL * h],
        axis=1,
    )
    return mean, _diag(std)


def predict(mean: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One frame ahead for every track."""
    if len(mean) == 0:
        return mean, cov
    h = mean[:, 3]
    std = np.stack(
        [_W_POS * h, _W_POS * h, np.full_like(h, 1e-2), _W_POS * h]
        + [_W_VEL * h, _W_VEL * h, np.full_like(h, 1e-5), _W_VEL * h],
        axis=1,
    )
    # F x and F P Fᵀ written out (F = [[I, I], [0, I]]): each entry is the sum of the same two numbers the
    # matrix products add (the rest are products with 0), so the result is the same, without four matmuls
    moved = mean.copy()
    moved[:, :4] += mean[:, 4:]
    rows = cov.copy()  # F P
    rows[:, :4, :] += cov[:, 4:, :]
    out = rows.copy()  # (F P) Fᵀ
    out[:, :, :4] += rows[:, :, 4:]
    return moved, _add_diag(out, std)


def update(mean: np.ndarray, cov: np.ndarray, xyah: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Correct N tracks with their N matched measurements."""
    if len(mean) == 0:
        return mean, cov
    h = mean[:, 3]
    std = np.stack([_W_POS * h, _W_POS * h, np.full_like(h, 1e-1), _W_POS * h], axis=1)
    projected_mean = mean[:, :4]
    projected_cov = _add_diag(cov[:, :4, :4].copy(), std)  # H P Hᵀ + R
    cross = cov[:, :, :4]  # P Hᵀ  [N, 8, 4]
    gain = np.linalg.solve(projected_cov, cross.transpose(0, 2, 1)).transpose(0, 2, 1)  # P Hᵀ S⁻¹ (S symmetric)
    innovation = xyah - projected_mean
    mean = mean + np.einsum("nij,nj->ni", gain, innovation)
    cov = cov - gain @ projected_cov @ gain.transpose(0, 2, 1)
    return mean, cov
