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


def nesterov_sgd_step(g, buf, lr, beta):
    """optax.sgd(lr, momentum=beta, nesterov=True): buf <- g + beta * buf; step = -lr * (g + beta * buf)."""
    buf = g + beta * buf
    return -lr * (g + beta * buf), buf


def is_sync(t, period):
    """The update with t updates before it synchronises."""
    return (t + 1) % period == 0


def participants(mask, step, k):
    """The learners that take part in the sync at `step`: `mask(step)` != 0, all when None."""
    if mask is None:
        return np.ones(k, bool)
    return np.asarray(mask(step)).reshape(k) != 0


def sma_period_reference(w0, s, t, *, steps, lr, beta, alpha, mu, sync_every, mask=None):
    """Algorithm 1 on sync steps only; in between each learner steps alone, z stays.

    With `mask` (step -> (k,) 0/1), only the participants of a sync take the correction
    and z moves by the sum of theirs (alpha unchanged), plus its momentum, even when
    nobody takes part.
    """
    k = s.shape[0]
    w = np.tile(np.asarray(w0, np.float64), (k, 1))
    z = z_prev = np.asarray(w0, np.float64).copy()
    buf = np.zeros_like(w)
    for step in range(steps):
        u, buf = sgd_step(s * w - t, buf, lr, beta)
        if is_sync(step, sync_every):
            c = alpha * (w - z) * participants(mask, step, k)[:, None]
            w = w + u - c
            z, z_prev = z + c.sum(axis=0) + mu * (z - z_prev), z
        else:
            w = w + u
    return w, z


def local_sgd_reference(w0, s, t, *, steps, lr, beta, every, warmup_steps=0, mask=None):
    """Local SGD: own steps; every `every` updates all learners become their mean.

    The first `warmup_steps` updates all sync. With `mask` (step -> (k,) 0/1), a sync
    averages its participants only and they become the mean; the others keep their
    weights; with no participant the sync changes nothing.
    """
    k = s.shape[0]
    w = np.tile(np.asarray(w0, np.float64), (k, 1))
    average = np.asarray(w0, np.float64).copy()
    buf = np.zeros_like(w)
    for step in range(steps):
        u, buf = sgd_step(s * w - t, buf, lr, beta)
        w = w + u
        if step < warmup_steps or is_sync(step, every):
            part = participants(mask, step, k)
            if part.any():
                average = w[part].mean(axis=0)
                w[part] = average
    return w, average


def diloco_reference(w0, s, t, *, steps, lr, beta, every, outer_lr, outer_beta):
    """DiLoCo with an SGD inner optimiser and a Nesterov SGD outer optimiser."""
    k = s.shape[0]
    w = np.tile(np.asarray(w0, np.float64), (k, 1))
    theta = np.asarray(w0, np.float64).copy()
    buf, outer_buf = np.zeros_like(w), np.zeros_like(theta)
    for step in range(steps):
        u, buf = sgd_step(s * w - t, buf, lr, beta)
        w = w + u
        if is_sync(step, every):
            delta = theta - w.mean(axis=0)
            outer_u, outer_buf = nesterov_sgd_step(delta, outer_buf, outer_lr, outer_beta)
            theta = theta + outer_u
            w = np.tile(theta, (k, 1))
    return w, theta


def hierarchical_reference(
    w0, s, t, *, hosts, steps, lr, beta, alpha, mu, every, outer_lr, outer_beta,
    compress=None, error_feedback=True,
):  # fmt: skip
    """SMA inside each host (rows host-major) at every update; DiLoCo across hosts; with
    `compress`, each host's theta - z_h (plus its residual) arrives quantised."""
    k = s.shape[0]
    per_host = k // hosts
    w = np.tile(np.asarray(w0, np.float64), (k, 1))
    z = np.tile(np.asarray(w0, np.float64), (hosts, 1))
    z_prev = z.copy()
    theta = np.asarray(w0, np.float64).copy()
    buf, outer_buf = np.zeros_like(w), np.zeros_like(theta)
    host = np.repeat(np.arange(hosts), per_host)
    error = np.zeros_like(z)
    for step in range(steps):
        u, buf = sgd_step(s * w - t, buf, lr, beta)
        c = alpha * (w - z[host])
        w = w + u - c
        sums = np.stack([c[host == h].sum(axis=0) for h in range(hosts)])
        z, z_prev = z + sums + mu * (z - z_prev), z
        if hosts > 1 and is_sync(step, every):
            if compress is None:
                delta = theta - z.mean(axis=0)
            else:
                total, residual = compressed_sum(theta[None] - z + error, compress)
                if error_feedback:
                    error = residual
                delta = total / hosts
            outer_u, outer_buf = nesterov_sgd_step(delta, outer_buf, outer_lr, outer_beta)
            theta = theta + outer_u
            shift = theta[None] - z
            w, z, z_prev = w + shift[host], z + shift, z_prev + shift
    return w, z, theta


LEAVES = (slice(0, 3), slice(3, 7))  # the harness's two parameter leaves, as columns
LEVELS = {"int8": 127, "int4": 7}


def quantised(c, kind, block=256):
    """`c` as it arrives after quantisation: blocks of `block` values scaled by
    max|c| / levels and rounded (int8, int4), or rounded to bfloat16."""
    if kind == "bf16":
        import ml_dtypes

        return np.asarray(c, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    pad = np.concatenate([c, np.zeros(-c.size % block)]).reshape(-1, block)
    top = np.abs(pad).max(axis=1, keepdims=True)
    scale = np.where(top > 0, top / LEVELS[kind], 1.0)
    q = np.clip(np.round(pad / scale), -LEVELS[kind], LEVELS[kind]) * scale
    return q.reshape(-1)[: c.size]


def compressed_sum(contributions, kind, block=256):
    """The sum over devices of their rows of `contributions` (D, n), each quantised, as a
    reduce-scatter then an all-gather: every device's values (in D shards of whole blocks)
    quantised, each shard's sum quantised again; and each device's residual (its own
    rounding, plus that of the shard sum it owns)."""
    devices, n = contributions.shape
    shard = -(-n // (devices * block)) * block
    padded = np.zeros((devices, devices * shard))
    padded[:, :n] = contributions
    sent = np.stack([quantised(row, kind, block) for row in padded])
    sums = sent.sum(axis=0)
    total = quantised(sums, kind, block)  # shard by shard: the shards are whole blocks
    residual = padded - sent
    for d in range(devices):
        cols = slice(d * shard, (d + 1) * shard)
        residual[d, cols] += sums[cols] - total[cols]
    return total[:n], residual[:, :n]


def diloco_options_reference(
    w0, s, t, *, devices, steps, lr, beta, every, outer_lr, outer_beta, fragments=None,
    mask=None, compress=None, error_feedback=True, overlap=0,
):  # fmt: skip
    """DiLoCo with its options, written from their definitions (diloco.py's docstring).

    fragments: list of column index arrays (fragment f syncs when (step + 1) % every ==
    f * every / F, with its own outer momentum); mask(step) -> (k,) 0/1 participants of
    the sync at that step (non-participants keep their weights); compress: each device
    sends its sum over participants of (theta - w'_j) plus its residual, quantised;
    overlap=1: the outer step and the restart (onto theta + this step's u_j) come one
    update after the sync.
    """
    k, n = s.shape
    m = k // devices
    fragments = fragments or [np.arange(n)]
    stride = every // len(fragments)
    w = np.tile(np.asarray(w0, np.float64), (k, 1))
    theta = np.asarray(w0, np.float64).copy()
    buf, outer_buf = np.zeros_like(w), np.zeros_like(theta)
    error = np.zeros((devices, n))
    pending = None  # (fragment columns, delta, participants)
    for step in range(steps):
        u, buf = sgd_step(s * w - t, buf, lr, beta)
        w_new = w + u
        if pending is not None:  # overlap: the last step's sync lands now
            cols, delta, who = pending
            outer_u, outer_buf[cols] = nesterov_sgd_step(delta, outer_buf[cols], outer_lr, outer_beta)
            theta[cols] = theta[cols] + outer_u
            w_new[np.ix_(who, cols)] = theta[cols] + u[np.ix_(who, cols)]
            pending = None
        r = (step + 1) % every
        if r % stride == 0:
            cols = fragments[r // stride]
            who = np.ones(k, bool) if mask is None else np.asarray(mask(step)) > 0
            if who.any():
                if compress is None:
                    delta = theta[cols] - w_new[np.ix_(who, cols)].mean(axis=0)
                else:  # residuals are kept per participant: times n in, over n out
                    count = who.sum()
                    c = np.stack([
                        (who[d * m:(d + 1) * m].sum() * theta
                         - (w_new[d * m:(d + 1) * m] * who[d * m:(d + 1) * m, None]).sum(0)
                         + count * error[d])[cols]
                        for d in range(devices)
                    ])  # fmt: skip
                    total, residual = compressed_sum(c, compress)
                    if error_feedback:
                        error[:, cols] = residual / count
                    delta = total / count
                if overlap:
                    pending = (cols, delta, np.flatnonzero(who))
                else:
                    outer_u, outer_buf[cols] = nesterov_sgd_step(
                        delta, outer_buf[cols], outer_lr, outer_beta
                    )
                    theta[cols] = theta[cols] + outer_u
                    w_new[np.ix_(who, cols)] = theta[cols]
        w = w_new
    return w, theta
