"""The exact maximiser of the augmented Hamiltonian of a layer affine in its parameters (docs/theory.md).

For a ``Linear`` or ``Conv2d`` entry, g(x, theta) = W x + b is affine in theta = (W, b), and so is
grad_x H = W^T p (the bias drops out). With x_n, x_{n+1} = g(x_n, theta^k), p_{n+1} and
p_n = grad_x H(theta^k) frozen, the augmented Hamiltonian of ``hamiltonian.LayerHamiltonian``
is then an exact concave quadratic in the step d = theta - theta^k (paper eq. (7), discrete form):

    Htilde(theta^k + d) = Htilde(theta^k) + G . d - 1/2 d' Q d,
    G = J' p - weight_decay theta^k                     (the feasibility residuals vanish at theta^k)
    Q = rho (J' J + K' K) + (weight_decay + 2 eps) I,

with J d = W_d x + b_d the change of the output and K d = W_d' p the change of grad_x H (sums over
the batch and, for a convolution, over the positions of its im2col patches). Its maximiser solves
Q d = G: no L-BFGS.

* ``Linear`` (x_s in R^K, p_s in R^O over the N = batch x leading positions): J'J acts as
  d_W -> d_W S with S = sum_s x_s x_s' [K, K], K'K as d_W -> P'P d_W with P'P = sum_s p_s p_s' [O, O].
  The bias is eliminated exactly (its block is (rho N + c) I): the reduced problem is the Sylvester
  equation d_W A + B d_W = G', A = rho S - rho^2/(rho N + c) m m' + c I (m = sum_s x_s), B = rho P'P,
  which the eigendecompositions A = U a U', B = V b V' solve: d_W = V [(V' G' U)_ij / (b_i + a_j)] U'.
* ``Conv2d`` (stride 1, no dilation, one group, zero padding): with X the im2col patches of x
  ([C k_h k_w (+1 for the bias), positions]) and Pt those of p for the transposed convolution
  (padding k - 1 - padding, kernel flipped), Q = rho (I_O (x) X X' + I_C (x) Pt Pt') + c I shares the
  kernel offset between its two terms, so it is no Kronecker sum: it is assembled densely
  ([m, m], m = O (C k_h k_w + 1)) and solved by a Cholesky factorisation. Where the patches would be large
  (the co-state patches of a first convolution: 8 channels on 28 x 28 images) or the channels come in blocks
  of 8 (``_by_lags``), the Gram matrices are formed from lag correlations of the images instead
  (``_shifted_gram``: the same sums, no patches), and J'p from a weight gradient.

Singular directions (c = 0 and rank-deficient batch data, e.g. the softmax co-state's zero sum over
classes) carry no gradient; the step is the minimum-norm maximiser there (a pseudo-inverse), which is
where L-BFGS started from theta^k also converges. Every solution is checked by two exact evaluations
of the objective (its increase against the quadratic's prediction: ``check``); a layer failing it, a box
the unconstrained maximiser leaves, an L1 / L0 penalty or a Linear without weight
decay (see ``supported``): ``None``, and the caller falls back to the iterative maximisers.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from .groups import LayerGroup
from .hamiltonian import LayerHamiltonian

__all__ = ["affine_maximise", "input_gram", "quadratic_sums", "QuadraticSums", "MAX_DENSE", "MAX_SIDE"]

#: the largest convolution (parameters per layer) solved densely: a Cholesky factorisation of [m, m]
MAX_DENSE = 2048
#: the largest side (input or output features) of a Linear solved by eigendecomposition
MAX_SIDE = 2048


def _conv_supported(conv: torch.nn.Conv2d) -> bool:
    return (conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple) and all(p <= k - 1 for p, k in zip(conv.padding, conv.kernel_size))
            and conv.weight.numel() + conv.out_channels <= MAX_DENSE)


def _variables(group: LayerGroup) -> Optional[bool]:
    """Whether the bias is a variable (True), fixed or absent (False); None if the rows are not (weight[, bias])."""
    if group.names == ["weight", "bias"]:
        return True
    if group.names == ["weight"]:
        return False
    return None


def supported(group: LayerGroup, objective: LayerHamiltonian) -> bool:
    """The cases where the quadratic is exact and its unconstrained maximiser is the answer (boxes checked later)."""
    layer = group.template
    if type(layer) not in (torch.nn.Linear, torch.nn.Conv2d) or _variables(group) is None:
        return False
    if objective.penalty is not None or not group.batched:
        return False
    if not objective.data.inputs.is_floating_point():
        return False
    if not (objective.rho > 0 or objective.weight_decay + 2 * objective.eps > 0):
        return False  # rho = 0 without weight decay: a linear objective, unbounded without a box
    if isinstance(layer, torch.nn.Conv2d):
        return _conv_supported(layer)
    # A Linear needs weight decay (or SQH's eps): without it the batch barely curves some directions (the
    # classifier of the CNN study: 392 features, 128 samples), the exact maximiser's steps there are ones
    # L-BFGS's few iterations never take, and training with a fixed rho became erratic (docs/theory.md)
    return objective.weight_decay + 2 * objective.eps > 0 and max(layer.in_features, layer.out_features) <= MAX_SIDE


def _world(objective: LayerHamiltonian) -> int:
    """How many ranks share the objective's weight decay and eps (each rank's objective holds 1 / world of them)."""
    return 1 if objective._reduce is None else objective._reduce.world_size


def _regularisation(objective: LayerHamiltonian) -> Tuple[float, float]:
    """(weight decay, c = weight decay + 2 eps) of the whole objective (over the ranks of a process group)."""
    world = _world(objective)
    return objective.weight_decay * world, (objective.weight_decay + 2 * objective.eps) * world


def _cutoff(eigenvalues: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """Curvatures below this are rounding of the batch sums (computed in ``dtype``): treated as 0. [G, 1...]"""
    return eigenvalues.abs().amax(-1, keepdim=True) * size * torch.finfo(dtype).eps


def _linear_sums(group: LayerGroup, objective: LayerHamiltonian, bias: bool) -> "QuadraticSums":
    """The batch sums of Linear rows that rho and eps leave alone (module docstring)."""
    layer, data = group.template, objective.data
    G = data.controls.shape[0]
    O, K = layer.out_features, layer.in_features
    x = data.inputs.reshape(G, -1, K)  # [G, N, K]
    p = data.costates.reshape(G, -1, O)  # [G, N, O]
    f64 = torch.float64
    parts = [(p.transpose(1, 2) @ x).to(f64).reshape(G, -1)]  # J' p for the weight [G, O K]
    if bias:
        parts.append(p.sum(1).to(f64))  # [G, O]
    # X [G, N, K] itself when there are fewer samples than features (one process), else S = X'X [G, K, K]
    wide = K > x.shape[1] and objective._reduce is None
    inputs = x.to(f64) if wide else (x.transpose(1, 2) @ x).to(f64)
    costates = (p.transpose(1, 2) @ p).to(f64)  # P'P [G, O, O]
    extra = x.sum(1).to(f64) if bias else None  # m = sum_s x_s [G, K]
    return QuadraticSums(torch.cat(parts, dim=1), inputs, costates, extra, float(x.shape[1]))


def _linear_step(group: LayerGroup, objective: LayerHamiltonian, bias: bool, sums: "QuadraticSums") -> torch.Tensor:
    """The maximising step d [G, m] of Linear rows: the Sylvester equation of the module docstring."""
    layer, data = group.template, objective.data
    rho, (wd, c) = objective.rho, _regularisation(objective)
    G = data.controls.shape[0]
    O, K = layer.out_features, layer.in_features
    N = sums.count
    u0 = data.controls
    W0 = u0[:, :O * K].reshape(G, O, K)
    f64 = torch.float64
    gW = sums.gradient[:, :O * K].reshape(G, O, K) - wd * W0.to(f64)
    D = rho * N + c  # the bias block (rho N + c) I, eliminated exactly
    if bias:
        b0 = u0[:, O * K:]
        gb = sums.gradient[:, O * K:] - wd * b0.to(f64)  # [G, O]
        m = sums.extra  # [G, K]
        rhs = gW - (rho / D) * gb[:, :, None] * m[:, None, :]
    else:
        rhs = gW
    b, Vb = torch.linalg.eigh(rho * sums.costates)  # B = rho P'P: [G, O], [G, O, O]
    if sums.inputs.shape[1] != K:  # X [G, N, K] with N < K
        # A = Z'Z + c I with Z = C^(1/2) X [N, K], C = rho (I - rho/D 1 1'): its N non-trivial eigenpairs from
        # the N x N matrix Z Z' (fewer samples than features), eigenvalue c on the rest
        X64 = sums.inputs
        shrink = 1 - (c / D) ** 0.5 if bias else 0.0
        Z = rho ** 0.5 * (X64 - shrink * X64.mean(1, keepdim=True))
        lam, Qn = torch.linalg.eigh(Z @ Z.transpose(1, 2))  # [G, N]
        keep = lam > _cutoff(lam, max(K, X64.shape[1]), data.inputs.dtype)
        U = (Z.transpose(1, 2) @ Qn) / torch.where(keep, lam, torch.ones_like(lam)).sqrt()[:, None, :]
        U = U * keep[:, None, :]  # [G, K, N], orthonormal columns (zero where dropped)
        a = lam + c
    else:
        A = rho * sums.inputs + c * torch.eye(K, dtype=f64, device=u0.device)
        if bias:
            A = A - (rho * rho / D) * m[:, :, None] * m[:, None, :]
        a, U = torch.linalg.eigh(A)  # [G, K], [G, K, K]
    cut = (a.abs().amax(-1) + b.abs().amax(-1) + c)[:, None, None] * max(K, O) * torch.finfo(data.inputs.dtype).eps

    def divide(T, denom):
        return torch.where(denom > cut, T / torch.where(denom > cut, denom, torch.ones_like(denom)), torch.zeros_like(T))

    VtR = Vb.transpose(1, 2) @ rhs  # [G, O, K]
    dW = Vb @ divide(VtR @ U, b[:, :, None] + a[:, None, :]) @ U.transpose(1, 2)  # [G, O, K]
    if U.shape[2] < K:  # the complement of U's columns, where A = c I
        rest = VtR - (VtR @ U) @ U.transpose(1, 2)
        dW = dW + Vb @ divide(rest, b[:, :, None] + c)
    parts = [dW.reshape(G, -1)]
    if bias:
        parts.append((gb - rho * (dW @ m[:, :, None])[..., 0]) / D)
    return torch.cat(parts, dim=1).to(u0.dtype)


def _patches(t: torch.Tensor, kernel: Tuple[int, int], padding: Tuple[int, int]) -> torch.Tensor:
    """im2col of t [G, B, C, H, W] -> [G, B, C kh kw, L] (L positions of the kernel): the patches as a view of the
    padded images, copied once (F.unfold's numbers, 5x faster: it loops over the images)."""
    G, B, C = t.shape[:3]
    (kh, kw), (ph, pw) = kernel, padding
    padded = F.pad(t, (pw, pw, ph, ph)) if ph or pw else t
    view = padded.unfold(3, kh, 1).unfold(4, kw, 1)  # [G, B, C, L_h, L_w, kh, kw]
    return view.permute(0, 1, 2, 5, 6, 3, 4).reshape(G, B, C * kh * kw, -1)


def _gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum over samples and positions of a b': [G, B, K, L] x [G, B, M, L] -> [G, K, M] (no transposed copy)."""
    return (a @ b.transpose(-1, -2)).sum(1)


#: im2col patches above this many elements (B x C kh kw x positions) cost more to copy than the lag correlations
#: of ``_shifted_gram`` cost to compute: measured 2.5x faster at 7.2M (8 channels, 28 x 28, batch 128), slower below 1M
MAX_PATCHES = 1 << 22
#: the same bound where the channels are a multiple of 8: there the lag correlations (a convolution's weight
#: gradient) run on the blocked kernels of the CPU backend, faster than im2col from 0.26M patch elements up (one
#: thread: 2.4 ms against 9.3 ms for 8 channels on 14 x 14 at batch 128, 1.4 against 1.9 on 8 x 8, 1.1 against 1.7
#: on 7 x 7 (0.45M); 2 and 4 channels stayed slower than im2col up to 3.6M)
MAX_PATCHES_BLOCKED = 1 << 18


def _by_lags(t: torch.Tensor, kernel: Tuple[int, int], padding: Tuple[int, int]) -> bool:
    """Whether the Gram matrix of t's patches [G, B, C, H, W] is formed from lag correlations, not im2col."""
    G, B, C = t.shape[:3]
    positions = (t.shape[3] + 2 * padding[0] - kernel[0] + 1) * (t.shape[4] + 2 * padding[1] - kernel[1] + 1)
    elements = B * C * kernel[0] * kernel[1] * positions
    return elements > MAX_PATCHES or (C % 8 == 0 and elements > MAX_PATCHES_BLOCKED)


def _patch_gram(t: torch.Tensor, kernel: Tuple[int, int], padding: Tuple[int, int]) -> torch.Tensor:
    """sum over samples and positions of patches(t) patches(t)' [G, C kh kw, C kh kw] float64; t [G, B, C, H, W]."""
    if not _by_lags(t, kernel, padding):
        X = _patches(t, kernel, padding)
        return _gram(X, X).to(torch.float64)
    t = t.transpose(0, 1)
    return _shifted_gram(t, t, kernel, padding)


def _with_bias_row(S: torch.Tensor, x: torch.Tensor, kernel: Tuple[int, int], padding: Tuple[int, int]) -> torch.Tensor:
    """The Gram matrix S [G, C J, C J] of x's patches (x [G, B, C, H, W]) extended by the bias, a constant input:
    its row holds each kernel offset's window sum of the batch, its diagonal the number of positions. [G, M, M]"""
    G, B = x.shape[:2]
    f64 = torch.float64
    window = F.unfold(x.sum(1, dtype=f64), kernel, padding=padding)  # [G, C J, positions]
    window_sums = window.sum(-1)
    count = torch.full((G, 1, 1), float(B * window.shape[-1]), dtype=f64, device=x.device)
    return torch.cat([torch.cat([S, window_sums[:, :, None]], dim=2),
                      torch.cat([window_sums[:, None, :], count], dim=2)], dim=1)


def input_gram(x: torch.Tensor, layer: torch.nn.Module, bias: bool) -> torch.Tensor:
    """sum over samples (and positions) of x~ x~' [G, M, M] float64, x~ the layer's input patches (a Conv2d's im2col
    columns, a Linear's input vector) followed by a 1 when the bias is a variable: the input factor of J'J,
    x [G, B, C, H, W] for a Conv2d, [G, B, ..., K] for a Linear."""
    if isinstance(layer, torch.nn.Conv2d):
        S = _patch_gram(x, layer.kernel_size, layer.padding)
        return _with_bias_row(S, x, layer.kernel_size, layer.padding) if bias else S
    X = x.reshape(x.shape[0], -1, x.shape[-1])  # [G, N, K]
    if bias:
        X = torch.cat([X, torch.ones_like(X[..., :1])], dim=-1)
    return (X.transpose(1, 2) @ X).to(torch.float64)


def conv_weight_grad(out_grad: torch.Tensor, inputs: torch.Tensor, weight: torch.Tensor, padding: Tuple[int, int],
                     groups: int) -> torch.Tensor:
    """The weight gradient of a grouped 2-D convolution with stride and dilation 1 (out_grad [B, groups O, H', W'],
    inputs [B, groups I, H, W], weight: any tensor of the weight's shape [groups O, I, kh, kw], read for its shape
    only): the weight output of ``aten.convolution_backward``, without the input gradient."""
    return torch.ops.aten.convolution_backward(out_grad, inputs, weight, None, (1, 1), padding, (1, 1), False, [0, 0],
                                               groups, (False, True, False))[1]


def _weight_grad(inputs: torch.Tensor, out_grad: torch.Tensor, kernel: Tuple[int, int],
                 padding: Tuple[int, int], per_sample: bool = True) -> torch.Tensor:
    """sum over samples and positions of out_grad[o, y, x] inputs_padded[i, y + u, x + v]: [G, O, I, ku, kv] float64.

    inputs [B, G, I, H, W], out_grad [B, G, O, H', W']: a convolution's weight gradient, what im2col followed
    by a matrix product computes, without the patches. Every sample is a group of its own (its sum over
    positions is short) and the samples are added in float64: one float32 accumulation over the whole batch
    lost about 3 digits (1e-4 relative error on the CNN study's 8-channel Gram matrix, against 3e-7 for
    im2col, enough to make its system indefinite). ``per_sample=False``: one float32 sum over the batch, for
    sums over a single row or column of the images.
    """
    B, G, I = inputs.shape[:3]
    O = out_grad.shape[2]
    # per sample: one sample, B G groups; else: B samples, G groups
    batch, groups = (1, B * G) if per_sample else (B, G)
    weight = out_grad.new_empty(1).expand(groups * O, I, *kernel)
    sums = conv_weight_grad(out_grad.reshape(batch, -1, *out_grad.shape[3:]),
                            inputs.reshape(batch, -1, *inputs.shape[3:]), weight, padding, groups)
    return sums.reshape(-1, G, O, I, *kernel).sum(0, dtype=torch.float64)


def _shifted_gram(a: torch.Tensor, b: torch.Tensor, kernel: Tuple[int, int], padding: Tuple[int, int]) -> torch.Tensor:
    """The Gram matrix of the im2col patches of a and b, without the patches: a, b [B, G, C, H, W] ->
    [G, Ca kh kw, Cb kh kw] float64, sum over samples and positions of patches(a) patches(b)'.

    With the full padding k - 1 every kernel offset's window covers the whole image, so entry
    ((c, j), (c', j')) is the lag correlation of channels c and c' at lag j' - j over the whole image (all
    lags at once: one weight gradient with a (2k - 1)-kernel). The padding asked for has R = k - 1 - padding
    fewer positions on each side: the patches at that ring of R rows (and columns) of positions are
    subtracted, and there most of a patch lies in the zero padding, so only the R kernel rows (columns)
    that reach into the image are formed: four thin im2col strips. The same sums in another order, for
    (2k - 1)^2 / k^4 of im2col's arithmetic (25/81 for 3 x 3; for a Gram matrix, b = a, k (2k - 1) / k^4, the
    lags dy >= 0) and small copies.
    """
    B, G, Ca, H, W = a.shape
    Cb = b.shape[2]
    (kh, kw), (ph, pw) = kernel, padding
    Rh, Rw = kh - 1 - ph, kw - 1 - pw
    lag = (kh - 1, kw - 1)
    size = (2 * kh - 1, 2 * kw - 1)  # every lag (dy, dx) in [-lag, lag]
    if b is a:  # a Gram matrix: lags dy >= 0 suffice, those below are their transposes (c, c', d) = (c', c, -d)
        upper = _weight_grad(F.pad(a, (lag[1], lag[1], 0, lag[0])), a, (kh, size[1]), (0, 0))  # [G, Ca, Ca, kh, 2kw-1]
        full = torch.cat([upper.transpose(1, 2).flip(-2, -1)[..., :lag[0], :], upper], dim=-2)
    else:
        full = _weight_grad(b, a, size, lag)  # [G, Ca, Cb, 2kh-1, 2kw-1]
    device = a.device
    # the lag of every pair of kernel offsets (j, j'): index lag + j' - j, [kh, kw, kh, kw]
    jy, jx = torch.arange(kh, device=device), torch.arange(kw, device=device)
    dy = (jy[None, None, :, None] - jy[:, None, None, None] + lag[0]).expand(kh, kw, kh, kw)
    dx = (jx[None, None, None, :] - jx[None, :, None, None] + lag[1]).expand(kh, kw, kh, kw)
    gram = full[..., dy, dx].permute(0, 1, 3, 4, 2, 5, 6).contiguous()  # [G, Ca, kh, kw, Cb, kh, kw]
    if Rh == 0 and Rw == 0:
        return gram.reshape(G, Ca * kh * kw, Cb * kh * kw)
    Hf, Wf = H + kh - 1, W + kw - 1  # positions with the full padding; below, coordinates of the images padded by lag

    def ring(rows: Tuple[int, int], cols: Tuple[int, int], k: Tuple[int, int]) -> torch.Tensor:
        """Gram of the patches (kernel k) of the window rows x cols of the images padded by lag: [G, Ca k, Cb k],
        float64 (few positions: the patches are small)."""
        def patches(t):  # the window alone, cut from t and zero-padded (F.pad crops at negative widths)
            window = F.pad(t, (lag[1] - cols[0], cols[1] - W - lag[1], lag[0] - rows[0], rows[1] - H - lag[0]))
            # patches as a view (F.unfold loops over the samples), copied once in kernel-major order
            cols_ = window.to(torch.float64).unfold(3, k[0], 1).unfold(4, k[1], 1)  # [B, G, C, L_h, L_w, kh, kw]
            return cols_.permute(1, 2, 5, 6, 0, 3, 4).flatten(4).flatten(1, 3)  # [G, C k, B L]
        pa = patches(a)
        pb = pa if b is a else patches(b)
        return pa @ pb.transpose(-1, -2)

    if Rh:
        # top: output rows [0, Rh) reach the image with kernel rows [kh - Rh, kh) only; bottom: [Hf - Rh, Hf) with [0, Rh)
        top = ring((kh - Rh, kh - 1 + Rh), (0, W + 2 * lag[1]), (Rh, kw)).reshape(G, Ca, Rh, kw, Cb, Rh, kw)
        bottom = ring((Hf - Rh, Hf + Rh - 1), (0, W + 2 * lag[1]), (Rh, kw)).reshape(G, Ca, Rh, kw, Cb, Rh, kw)
        gram[:, :, kh - Rh:, :, :, kh - Rh:, :] -= top
        gram[:, :, :Rh, :, :, :Rh, :] -= bottom
    if Rw:  # left and right, on the output rows the padding asked for keeps (the corners went with top and bottom)
        rows = (Rh, Hf - Rh + kh - 1)
        left = ring(rows, (kw - Rw, kw - 1 + Rw), (kh, Rw)).reshape(G, Ca, kh, Rw, Cb, kh, Rw)
        right = ring(rows, (Wf - Rw, Wf + Rw - 1), (kh, Rw)).reshape(G, Ca, kh, Rw, Cb, kh, Rw)
        gram[:, :, :, kw - Rw:, :, :, kw - Rw:] -= left
        gram[:, :, :, :Rw, :, :, :Rw] -= right
    return gram.reshape(G, Ca * kh * kw, Cb * kh * kw)


def _conv_sums(group: LayerGroup, objective: LayerHamiltonian, bias: bool) -> "QuadraticSums":
    """The batch sums of Conv2d rows that rho and eps leave alone (module docstring)."""
    conv, data = group.template, objective.data
    G = data.controls.shape[0]
    O, C = conv.out_channels, conv.in_channels
    kh, kw = conv.kernel_size
    J = kh * kw
    x, p = data.inputs, data.costates  # [G, B, C, H, W], [G, B, O, H', W']
    f64 = torch.float64
    if _by_lags(x, conv.kernel_size, conv.padding):  # no patches: J'p a weight gradient (per sample, float64 sum)
        grad = _weight_grad(x.transpose(0, 1), p.transpose(0, 1), conv.kernel_size, conv.padding)
        grad = grad.reshape(G, O, C * J)
        xt = x.transpose(0, 1)
        S = _shifted_gram(xt, xt, conv.kernel_size, conv.padding)  # the same tensor: its Gram (lags dy >= 0)
    else:
        X = _patches(x, conv.kernel_size, conv.padding)  # [G, B, C J, L]
        grad = _gram(p.reshape(G, p.shape[1], O, -1), X).to(f64)  # J'p: [G, O, C J]
        S = _gram(X, X).to(f64)  # [G, C J, C J]
    parts = [grad.reshape(G, -1)]
    if bias:
        parts.append(p.sum((3, 4)).sum(1, dtype=f64))  # per image in float32, then over the batch in float64
        S = _with_bias_row(S, x, conv.kernel_size, conv.padding)
    # the transposed convolution's patches of p, at the input's positions, kernel offsets flipped
    PP = _patch_gram(p, conv.kernel_size, (kh - 1 - conv.padding[0], kw - 1 - conv.padding[1]))
    PP = PP.reshape(G, O, J, O, J).flip(2, 4)  # [(o, j), (o', j')]
    return QuadraticSums(torch.cat(parts, dim=1), S, PP, None, float(x.shape[1] * p.shape[3] * p.shape[4]))


def _conv_step(group: LayerGroup, objective: LayerHamiltonian, bias: bool, sums: "QuadraticSums") -> torch.Tensor:
    """The maximising step d [G, m] of Conv2d rows: the dense system of the module docstring."""
    conv, data = group.template, objective.data
    rho, (wd, c) = objective.rho, _regularisation(objective)
    u0 = data.controls
    G = u0.shape[0]
    O, C = conv.out_channels, conv.in_channels
    J = conv.kernel_size[0] * conv.kernel_size[1]
    f64 = torch.float64
    M = C * J + int(bias)  # columns of the augmented weight [O, M]
    Q = u0.new_zeros(G, O, M, O, M, dtype=f64)
    if rho > 0:
        # I_O (x) S and I_C (x) PP added in place on Q's diagonals (no Kronecker products formed)
        Q.diagonal(dim1=1, dim2=3).add_(rho * sums.inputs[..., None])
        co = Q[:, :, :C * J, :, :C * J].unflatten(4, (C, J)).unflatten(2, (C, J))  # [G, O, C, J, O, C, J], a view
        co.diagonal(dim1=2, dim2=5).add_(rho * sums.costates[..., None])
    Q = Q.reshape(G, O * M, O * M)
    Q.diagonal(dim1=1, dim2=2).add_(c)
    grad = torch.cat([sums.gradient[:, :O * C * J].reshape(G, O, C * J),
                      sums.gradient[:, O * C * J:].reshape(G, O, 1)] if bias else
                     [sums.gradient.reshape(G, O, C * J)], dim=2)
    theta = torch.cat([u0[:, :O * C * J].reshape(G, O, C * J),
                       u0[:, O * C * J:].reshape(G, O, 1)] if bias else [u0.reshape(G, O, C * J)], dim=2)
    rhs = (grad - wd * theta.to(f64)).reshape(G, O * M, 1)
    L, info = torch.linalg.cholesky_ex(Q)
    if bool((info == 0).all()):
        # two triangular solves: the numbers of cholesky_solve in a seventh of its time (584 x 584: 0.05 ms
        # against 0.35 ms)
        step = torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, rhs, upper=False),
                                             upper=True)[..., 0]
    else:  # singular: the minimum-norm maximiser
        lam, V = torch.linalg.eigh(Q)
        cut = _cutoff(lam, O * M, data.inputs.dtype)
        coef = (V.transpose(1, 2) @ rhs)[..., 0]
        coef = torch.where(lam > cut, coef / torch.where(lam > cut, lam, torch.ones_like(lam)), torch.zeros_like(coef))
        step = (V @ coef[..., None])[..., 0]
    step = step.reshape(G, O, M)
    parts = [step[:, :, :C * J].reshape(G, -1)]
    if bias:
        parts.append(step[:, :, C * J])
    return torch.cat(parts, dim=1).to(u0.dtype)


class QuadraticSums(NamedTuple):
    """The batch sums of a Linear / Conv2d group's quadratic that neither rho nor eps changes (``quadratic_sums``).

    gradient: J'p [G, m] float64, in the rows' order (weight, then bias): the gradient of the plain Hamiltonian
    p . g in theta, the same at every theta (g is affine in it), so it also gives the gain p . J d of any step;
    inputs: Conv2d X X' [G, M, M] (the bias's row included); Linear S = X'X [G, K, K], or X [G, N, K] itself
    when there are fewer samples N than features K;
    costates: Conv2d Pt Pt' [G, O, J, O, J] (kernel offsets flipped); Linear P'P [G, O, O];
    extra: Linear with a bias m = sum_s x_s [G, K]; else None;
    count: the number of terms of the sums (samples, times positions for a Conv2d).
    In a process group every sum is the total over the ranks (S, not X, for a Linear).
    """

    gradient: torch.Tensor
    inputs: torch.Tensor
    costates: torch.Tensor
    extra: Optional[torch.Tensor]
    count: float


def quadratic_sums(group: LayerGroup, objective: LayerHamiltonian) -> Optional[QuadraticSums]:
    """The sums ``affine_maximise`` solves with, formed once for a step's data (the adaptive rules' trials change
    rho and eps, not these), or None where the closed form does not apply (``supported``)."""
    if not supported(group, objective):
        return None
    bias = _variables(group)
    make = _linear_sums if isinstance(group.template, torch.nn.Linear) else _conv_sums
    with torch.no_grad():
        if objective._reduce is None:
            return make(group, objective, bias)
        return _totalled_sums(group, objective, lambda: make(group, objective, bias))


def _totalled_sums(group: LayerGroup, objective: LayerHamiltonian, local) -> QuadraticSums:
    """``local()``'s sums (this rank's samples) made totals over the ranks, in one fused all-reduce."""
    layer = group.template
    G = objective.data.controls.shape[0]
    bias = _variables(group)
    if isinstance(layer, torch.nn.Linear):
        O, K = layer.out_features, layer.in_features
        shapes = [(O * K + O * bias,), (K, K), (O, O)] + ([(K,)] if bias else [])
    else:
        O, C = layer.out_channels, layer.in_channels
        J = layer.kernel_size[0] * layer.kernel_size[1]
        M = C * J + int(bias)
        shapes = [(O * M,), (M, M), (O, J, O, J)]
    sizes = [math.prod(shape) for shape in shapes]

    def flat():
        sums = local()
        parts = [sums.gradient, sums.inputs, sums.costates] + ([sums.extra] if sums.extra is not None else [])
        count = sums.gradient.new_full((G, 1), sums.count)
        return torch.cat([t.reshape(G, -1) for t in parts] + [count], dim=1)

    like = objective.data.controls.new_zeros((), dtype=torch.float64)
    fused = objective._totalled(flat, (G, sum(sizes) + 1), like)
    parts = [t.reshape(G, *shape) for t, shape in zip(fused[:, :-1].split(sizes, dim=1), shapes)]
    extra = parts[3] if len(parts) > 3 else None
    return QuadraticSums(parts[0], parts[1], parts[2], extra, float(fused[0, -1]))


def affine_maximise(group: LayerGroup, objective: LayerHamiltonian, check: bool = True,
                    sums: Optional[QuadraticSums] = None) -> Optional[torch.Tensor]:
    """The exact maximiser [G, m] of a Linear / Conv2d group's augmented Hamiltonian, or None (see module doc).

    ``check``: compare the objective's exact increase with the quadratic's (two evaluations of the layer and
    its input gradient); the optimizer checks a group at its first step, the structure being fixed after that.
    ``sums``: ``quadratic_sums`` of this objective's data, formed here when not given.
    """
    if not supported(group, objective):
        return None
    bias = _variables(group)
    u0 = objective.data.controls
    with torch.no_grad():
        if sums is None:
            sums = quadratic_sums(group, objective)
        if isinstance(group.template, torch.nn.Linear):
            d = _linear_step(group, objective, bias, sums)
        else:
            d = _conv_step(group, objective, bias, sums)
        u = u0 + d
        if not bool(torch.isfinite(u).all()):
            return None
        low, high = group.controls.bounds(u0.dtype, u0.device)
        if not bool(((u >= low) & (u <= high)).all()):
            return None  # the box is active: the iterative (projected) maximiser handles it
        if not check:
            return u
        # the check: the exact increase against the quadratic's, G.d - 1/2 d'Qd = 1/2 G.d at the maximiser
        exact = objective.with_input_costates()  # the evaluations read p_n
        value0, value = exact(u0), exact(u)
        predicted = _predicted_gain(group, objective, d)
        scale = value0.abs() + predicted.abs() + 1.0
        tol = torch.finfo(u0.dtype).eps ** 0.5 * 10 * scale
        if not bool(((value - value0 - predicted).abs() <= tol).all()):
            return None
    return u


def _predicted_gain(group: LayerGroup, objective: LayerHamiltonian, d: torch.Tensor) -> torch.Tensor:
    """G . d / 2 [G]: the quadratic's gain at its maximiser (Q d = G), with G = J'p - wd theta^k."""
    data, layer = objective.data, group.template
    G = d.shape[0]
    wd, _ = _regularisation(objective)
    u0 = data.controls
    linear = objective._totalled(lambda: _plain_change(group, objective, d), (G,), u0)
    return 0.5 * (linear - wd * (u0 * d).sum(1))


def _plain_change(group: LayerGroup, objective: LayerHamiltonian, d: torch.Tensor) -> torch.Tensor:
    """J'p . d = p . (J d) [G] over this process's samples: the plain Hamiltonian's change, one forward pass of
    the layer at the step."""
    data, layer = objective.data, group.template
    G = d.shape[0]
    if isinstance(layer, torch.nn.Linear):
        O, K = layer.out_features, layer.in_features
        Wd = d[:, :O * K].reshape(G, O, K)
        out = data.inputs.reshape(G, -1, K) @ Wd.transpose(1, 2)
        if d.shape[1] > O * K:
            out = out + d[:, None, O * K:]
        linear = (data.costates.reshape(G, -1, O) * out).sum((1, 2))
    else:
        n_w = layer.weight.numel()
        x = data.inputs
        out = torch.stack([F.conv2d(x[g], d[g, :n_w].reshape(layer.weight.shape), padding=layer.padding)
                           for g in range(G)])  # G: the few layers of one group
        if d.shape[1] > n_w:
            out = out + d[:, None, n_w:, None, None]
        linear = (data.costates * out).sum(tuple(range(1, out.ndim)))
    return linear
