"""Float64 NumPy references of the paper's equations, written from the paper.

Learners are rows of a (k, n) array in global order (device-major, then the
learners on that device). Gradients come from a fixed linear field
`g_j(w) = s_j * w - t_j`, so they depend on each learner's own weights.
"""

import numpy as np


def sgd_step(g, buf, lr, beta):
    """optax.sgd(lr, momentum=beta): buf <- g + beta * buf; step = -lr * buf."""
    buf = g + beta * buf
    return -lr * buf, buf


def sma_reference(w0, s, t, *, steps, lr, beta, alpha, mu):
    """Algorithm 1 of CROSSBOW with an SGD(-momentum) learner optimiser."""
    k = s.shape[0]
    w = np.tile(np.asarray(w0, np.float64), (k, 1))
    z = z_prev = np.asarray(w0, np.float64).copy()
    buf = np.zeros_like(w)
    for _ in range(steps):
        u, buf = sgd_step(s * w - t, buf, lr, beta)
        c = alpha * (w - z)
        w = w + u - c
        z, z_prev = z + c.sum(axis=0) + mu * (z - z_prev), z
    return w, z


def ssgd_reference(w0, s, t, *, steps, lr, beta):
    """Synchronous SGD: the mean gradient of all k learners, one step."""
    w = np.asarray(w0, np.float64).copy()
    buf = np.zeros_like(w)
    for _ in range(steps):
        u, buf = sgd_step((s * w - t).mean(axis=0), buf, lr, beta)
        w = w + u
    return w
