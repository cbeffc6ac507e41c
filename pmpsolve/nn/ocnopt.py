"""``pmp.nn.OCNOpt``: training a network by differential dynamic programming over its layers.

OCNOpt (Liu, Chen and Theodorou, "Optimal Control Theoretic Neural Optimizer"; its conference
version DDPNOpt, ICLR 2021, arXiv 2002.08809) reads back-propagation as the first-order
expansion of the Bellman equation along the layers x_{t+1} = f_t(x_t, theta_t) of a
``torch.nn.Sequential``, and takes the second-order expansion instead. One ``step(closure)``:

1. the closure's forward and backward pass record every entry's input x_t and the
   back-propagated d loss / d x_{t+1} (``recording.CostateRecorder``, the hooks of ``pmp.nn.EMSA``),
   and, for ``curvature="kfac"``, the input and output gradient of every ``Linear`` / ``Conv2d``;
2. the DDP backward pass over the entries t = T-1, ..., 0, with the Gauss-Newton
   expansion of Q_t and the value Hessian in the outer-product form V_xx^i = B V_x^i V_x^i^T
   of each sample i of the batch (B samples; the loss is the batch mean, so V_x^i carries 1/B):

       Q_theta     = l_theta + sum_i q_i,            q_i   = f_theta^i^T V_x'^i   (per-sample)
       Q_thetatheta = l_thetatheta + B sum_i q_i q_i^T        (K-FAC: A (x) G per Linear / Conv2d)
       Q_thetax dx  = B sum_i q_i (r_i . dx^i),       r_i   = f_x^i^T V_x'^i
       k = -Q_thetatheta^-1 Q_theta,  K dx = -Q_thetatheta^-1 Q_thetax dx
       V_x^i = r_i + (Q_xtheta k)_i = r_i (1 + B q_i . k)     (and V_xx^i = B V_x^i V_x^i^T again)

   so V_x^i is the back-propagated gradient times a per-sample factor: a running product C_i
   over the later entries rescales the recorded gradients, and no second backward pass is run;
3. the update theta_t <- theta_t + lr (k_t + K_t dx_t): with ``feedback=True`` a second forward
   pass through the entries, where dx_t = (new input) - (old input) of entry t after the
   entries before it moved, and r_i . dx^i is a Jacobian-vector product of the entry at its old
   parameters; ``feedback=False`` drops K (a K-FAC-type preconditioned step, no second pass).

l_theta = weight_decay * theta (the entries' L2 cost). Q_thetatheta gets ``damping`` * I (Tikhonov;
for K-FAC split between the factors by the trace-norm rule of Martens and Grosse 2015, sec. 6.3).
``curvature="exact"`` forms the dense block B sum_i q_i q_i^T from per-sample gradients
(``torch.func``), for any entry, in small networks.

``value_hessian="gauss-newton"`` (with ``loss="mse"`` or ``"cross_entropy"``) replaces the outer
product by the loss Hessian at the output, H_i = S_i S_i^T, propagated back in the Gauss-Newton
form V_xx = f_x^T V_xx' f_x (S(t) = f_x^T S(t+1), one batched backward pass of the R directions):
Q_thetatheta = sum_ir q_ir q_ir^T with q_ir = f_theta^i^T s_ir (the block J^T H J), Q_thetax dx =
sum_ir q_ir (s_ir(t) . dx^i), V_x^i = g_i + S_i(t) U_i (``OCNOpt._gauss_newton_pass``).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.func import grad, vjp, vmap

from ..controls import Reals
from .affine import _patch_gram
from .groups import LayerGroup
from .optim import Optimizer as _PMPOptimizer
from .optim import _check_entries, _finite, _whole
from .recording import CostateRecorder

__all__ = ["OCNOpt", "KFAC_LAYERS"]

#: layers with a Kronecker-factored curvature (their output is affine in the parameters)
KFAC_LAYERS = (torch.nn.Linear, torch.nn.Conv2d)
#: largest entry (number of parameters) whose dense block ``curvature="exact"`` forms
EXACT_LIMIT = 4096
#: the value Hessians: the per-sample outer product B V_x V_x^T, or the loss Hessian propagated back (GGN)
VALUE_HESSIANS = ("outer", "gauss-newton")
#: the losses whose Hessian at the model's output ``value_hessian="gauss-newton"`` knows
LOSSES = ("mse", "cross_entropy")
_BATCH_NORM = torch.nn.modules.batchnorm._BatchNorm


class _KFACModule:
    """One ``Linear`` / ``Conv2d`` of an entry: its parameters as one matrix [out, K] (bias the last column).

    The per-sample parameter gradient of V_x' . f is q_i = sum_p d_ip abar_ip^T over the P positions of
    sample i (abar: the input patch with a 1 for the bias, d: dQ/d(output)); the Kronecker factors of
    B sum_i q_i q_i^T are A = (1/B) sum_ip abar abar^T and G = (B/P) sum_ip d d^T (Grosse and Martens 2016).
    Convolutions are handled in the layout conv2d uses, without transposing the patches.
    """

    def __init__(self, module: torch.nn.Module, name: str):
        self.module, self.name = module, name
        self.bias = module.bias is not None
        self.conv = isinstance(module, torch.nn.Conv2d)
        # stride and dilation 1, padding at most k - 1: the lag correlations of ``_patch_gram`` apply
        self.plain = self.conv and module.stride == (1, 1) and module.dilation == (1, 1) and all(
            p <= k - 1 for p, k in zip(module.padding, module.kernel_size))

    def matrix(self) -> torch.Tensor:
        w = self.module.weight.detach().reshape(self.module.weight.shape[0], -1)
        return torch.cat([w, self.module.bias.detach()[:, None]], 1) if self.bias else w

    def split(self, M: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """[out, K] -> (weight-shaped, bias or None)."""
        w = self.module.weight
        return M[:, :w[0].numel()].reshape(w.shape), (M[:, -1] if self.bias else None)

    def add(self, step: torch.Tensor) -> None:
        """theta += step [out, K] (in place, outside autograd)."""
        w, b = self.split(step)
        with torch.no_grad():
            self.module.weight.add_(w)
            if self.bias:
                self.module.bias.add_(b)

    def _with_bias(self, M: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
        return torch.cat([M, column[:, None]], 1) if self.bias else M

    def factors(self, a: torch.Tensor, d: torch.Tensor, batch: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """A [K, K] and G [out, out] of inputs a [B, ...] and output gradients d [B, ...]."""
        A, positions = self.input_factor(a, batch)
        return A, self.output_sum(d) * (batch / positions)

    def input_factor(self, a: torch.Tensor, batch: int) -> Tuple[torch.Tensor, int]:
        """A = (1/B) sum_ip abar abar^T [K, K] of inputs a [B, ...], and the number P of positions per sample."""
        if self.conv and self.plain:
            # the Gram matrix of the patches, from lag correlations where those are cheaper than im2col (one
            # home with pmp.nn.EMSA's closed-form step: ``affine._patch_gram``), added in float64
            m = self.module
            A = _patch_gram(a.unsqueeze(0), m.kernel_size, m.padding)[0].to(a.dtype)
            # the patches' sums: the patches of the sum over the samples (one image's im2col)
            S = torch.nn.functional.unfold(a.sum(0, keepdim=True), m.kernel_size, padding=m.padding)  # [1, K', P]
            positions, total = S.shape[-1], S.sum((0, 2))
        elif self.conv:
            m = self.module
            U = torch.nn.functional.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride)  # [B, K', P]
            positions = U.shape[-1]
            # per-sample products summed: no transposed copy of the patches (measured ~20 % faster)
            A, total = torch.bmm(U, U.mT).sum(0), U.sum((0, 2))
        else:
            U = a.reshape(-1, a.shape[-1])  # [B P, K']
            positions = U.shape[0] // batch
            A, total = U.T @ U, U.sum(0)
        if self.bias:
            corner = torch.full((1, 1), float(batch * positions), dtype=A.dtype, device=A.device)
            A = torch.cat([torch.cat([A, total[:, None]], 1), torch.cat([total[None], corner], 1)], 0)
        return A / batch, positions

    def output_sum(self, d: torch.Tensor) -> torch.Tensor:
        """sum_ip d d^T [out, out] of output vectors d [N, ...] (N: samples, or samples x directions)."""
        if self.conv:
            D = d.reshape(d.shape[0], d.shape[1], -1)  # [N, out, P]
            return torch.bmm(D, D.mT).sum(0)
        D = d.reshape(-1, d.shape[-1])  # [N P, out]
        return D.T @ D

    def gradient(self, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """sum_i q_i [out, K]: the parameter gradient of sum_i d_i . f(a_i)."""
        m = self.module
        if self.conv:
            w = torch.nn.grad.conv2d_weight(a, m.weight.shape, d, m.stride, m.padding, m.dilation, m.groups)
            return self._with_bias(w.reshape(w.shape[0], -1), d.sum((0, 2, 3)))
        d2, a2 = d.reshape(-1, d.shape[-1]), a.reshape(-1, a.shape[-1])
        return self._with_bias(d2.T @ a2, d2.sum(0))

    def output(self, a: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        """The layer's output [B, ...] at inputs a with parameters M [out, K]: f_theta M (the layer is affine)."""
        m = self.module
        w, b = self.split(M)
        if self.conv:
            return torch.nn.functional.conv2d(a, w, b, m.stride, m.padding, m.dilation, m.groups)
        return torch.nn.functional.linear(a, w, b)

    def dots(self, a: torch.Tensor, d: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        """q_i . M for every sample [B]: the layer's output with parameters M against d_i."""
        return (self.output(a, M) * d).reshape(d.shape[0], -1).sum(1)


class OCNOpt(torch.optim.Optimizer):
    """Train a ``torch.nn.Sequential`` by OCNOpt: DDP over its entries, layer-wise feedback policies.

    The entries of the Sequential are the steps x_{t+1} = f_t(x_t, theta_t) (entries without
    parameters: activations, pooling, flatten); the closure is the one of ``pmp.nn.EMSA`` and
    ``torch.optim.LBFGS``. See the module docstring for the equations and docs/networks.md.

    Args:
        model: a ``torch.nn.Sequential``; with ``curvature="kfac"`` every module with parameters
            inside its entries is a ``Linear`` or a ``Conv2d`` (e.g. ``pmp.nn.Residual`` around them).
        lr: the step size alpha of theta + alpha (k + K dx); 1 is the DDP step (read from
            ``param_groups`` at every step, so a ``torch.optim.lr_scheduler`` can drive it).
        damping: lambda > 0 added to Q_thetatheta (Levenberg-Marquardt / Tikhonov).
        curvature: ``"kfac"`` (Kronecker factors per Linear / Conv2d) or ``"exact"`` (the dense
            Gauss-Newton block of each entry from per-sample gradients; any entry torch.func can
            differentiate, up to 4096 parameters per entry).
        feedback: True: the feedback gains K_t, applied in a second forward pass; False: k_t only.
        weight_decay: l_t(theta) = weight_decay/2 |theta|^2 for every parameter.
        stat_decay: the K-FAC factors are moving averages, F <- stat_decay F + (1 - stat_decay) F_batch
            (0: the batch's own); the gradient and the feedback always use the batch.
        curvature_every: the K-FAC factors (and their Cholesky factors) are updated at the first step and
            then every ``curvature_every`` steps, as K-FAC implementations do: the input factor of a
            convolution costs (in_channels k^2)^2 per position, several convolutions (docs/networks.md).
        value_hessian: ``"outer"`` (V_xx^i = B V_x^i V_x^i^T, the empirical Fisher; no extra pass) or
            ``"gauss-newton"`` (the loss Hessian at the output propagated back: Gauss-Newton blocks
            J^T H J; one extra forward pass and a batched backward pass of R directions a step).
        loss: with ``value_hessian="gauss-newton"``: ``"mse"`` (``mse_loss(model(x), y)``, the mean over
            every output entry; R = entries a sample) or ``"cross_entropy"`` (``cross_entropy(model(x),
            labels)``, the batch mean; R = classes). The closure's loss is checked against it.

    Example:
        >>> import torch, pmpsolve as pmp
        >>> torch.manual_seed(0) and None
        >>> x = torch.randn(64, 2); y = (x[:, 0] * x[:, 1] > 0).long()
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(),
        ...     pmp.nn.Residual(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh()), 0.5),
        ...     torch.nn.Linear(16, 2))
        >>> opt = pmp.nn.OCNOpt(model)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.cross_entropy(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> first = float(opt.step(closure))
        >>> for _ in range(20):
        ...     last = float(opt.step(closure))
        >>> last < first
        True

    References:
        G.-H. Liu, T. Chen, E. A. Theodorou, Differential Dynamic Programming Neural Optimizer
        (DDPNOpt), ICLR 2021, arXiv:2002.08809 (the DDP backward pass, sec. 3); J. Martens, R. Grosse,
        Optimizing Neural Networks with Kronecker-factored Approximate Curvature, ICML 2015;
        R. Grosse, J. Martens, A Kronecker-factored approximate Fisher matrix for convolution layers, 2016.
    """

    def __init__(self, model: torch.nn.Module, lr: float = 1.0, damping: float = 0.3, curvature: str = "kfac",
                 feedback: bool = True, weight_decay: float = 0.0, stat_decay: float = 0.9,
                 curvature_every: int = 1, value_hessian: str = "outer", loss: Optional[str] = None):
        if not isinstance(model, torch.nn.Sequential):
            raise TypeError(
                f"pmp.nn.OCNOpt trains a torch.nn.Sequential whose entries are the layers x_(t+1) = f_t(x_t, "
                f"theta_t), got {type(model).__name__}. Write the model as torch.nn.Sequential(layer_0, ..., "
                "layer_(T-1)) (pmp.nn.Residual for residual layers)")
        lr = _positive("lr", lr)
        damping = _positive("damping", damping)
        weight_decay = _finite("weight_decay", weight_decay)
        stat_decay = _finite("stat_decay", stat_decay)
        if stat_decay >= 1:
            raise ValueError(f"`stat_decay` must be in [0, 1), got {stat_decay!r} (1 would never use a batch)")
        curvature_every = _whole("curvature_every", curvature_every, 1)
        if curvature not in ("kfac", "exact"):
            raise ValueError(f"`curvature` must be 'kfac' (Kronecker factors of Linear / Conv2d layers) or 'exact' "
                             f"(dense Gauss-Newton blocks, small layers), got {curvature!r}")
        if not isinstance(feedback, bool):
            raise TypeError(f"`feedback` must be True or False, got {feedback!r}")
        if value_hessian not in VALUE_HESSIANS:
            raise ValueError(f"`value_hessian` must be 'outer' (B V_x V_x^T per sample, the empirical Fisher) or "
                             f"'gauss-newton' (the loss Hessian propagated back, with `loss=`), got {value_hessian!r}")
        if value_hessian == "gauss-newton" and loss not in LOSSES:
            raise ValueError(
                f"value_hessian='gauss-newton' needs the loss Hessian at the model's output: pass `loss='mse'` "
                f"(torch.nn.functional.mse_loss(model(x), y), the mean over all output entries) or "
                f"`loss='cross_entropy'` (torch.nn.functional.cross_entropy(model(x), labels), the batch mean), "
                f"got loss={loss!r}")
        if value_hessian == "outer" and loss is not None:
            raise ValueError(f"`loss` is used by value_hessian='gauss-newton' only, got loss={loss!r} with "
                             "value_hessian='outer'. Drop `loss` or pass value_hessian='gauss-newton'")
        _check_entries(model)
        self._entries: Dict[int, torch.nn.Module] = {
            n: module for n, module in enumerate(model) if any(p.requires_grad for p in module.parameters())}
        if not self._entries:
            raise ValueError("pmp.nn.OCNOpt: the model has no trainable parameters")
        self._model = model
        self._layers = dict(enumerate(model))  # the name pmp.nn.Optimizer's record checks read
        for n, entry in self._entries.items():
            for name, module in entry.named_modules():
                if isinstance(module, _BATCH_NORM):
                    raise ValueError(
                        f"pmp.nn.OCNOpt: entry {n} contains {type(module).__name__} ({name or 'the entry'}), which "
                        "couples the samples of a batch: the per-sample expansion of the value function does not "
                        "hold. Remove the batch norm (or train this model with pmp.nn.EMSA)")
        self._kfac: Dict[int, List[_KFACModule]] = {}
        self._groups: Dict[int, LayerGroup] = {}
        if curvature == "kfac":
            for n, entry in self._entries.items():
                self._kfac[n] = _kfac_modules(n, entry)
        else:
            for n, entry in self._entries.items():
                names = [name for name, p in entry.named_parameters() if p.requires_grad]
                size = sum(p.numel() for p in entry.parameters() if p.requires_grad)
                if size > EXACT_LIMIT:
                    raise ValueError(
                        f"pmp.nn.OCNOpt: entry {n} ({type(entry).__name__}) has {size} parameters; "
                        f"curvature='exact' forms a dense {size} x {size} block (limit {EXACT_LIMIT}). Use "
                        "curvature='kfac' (Linear / Conv2d layers)")
                self._groups[n] = LayerGroup([n], [entry], names, Reals(size), None)
        defaults = dict(lr=lr, damping=damping, weight_decay=weight_decay, stat_decay=stat_decay,
                        curvature=curvature, feedback=feedback, curvature_every=curvature_every)
        if value_hessian != "outer":  # (the defaults of the outer form stay as they were)
            defaults.update(value_hessian=value_hessian, loss=loss)
        params = [p for module in self._entries.values() for p in module.parameters() if p.requires_grad]
        super().__init__(params, defaults)
        # every entry: the input gradient d loss / d x_t of an entry is the output gradient of the one before
        self._recorder = CostateRecorder(self._layers)
        modules = {j: m.module for j, m in enumerate(m for ms in self._kfac.values() for m in ms)}
        self._module_recorder = CostateRecorder(modules) if modules else None
        self._calls: Dict[int, int] = {}
        self._solvers: Dict[str, tuple] = {}  # per K-FAC module: (damping, dtype) and its Kronecker solver
        self._call_hooks = [m.register_forward_pre_hook(self._count(j)) for j, m in modules.items()]
        self._gauss_newton = value_hessian == "gauss-newton"
        # value_hessian="gauss-newton": the outputs of the K-FAC modules in the extra forward pass
        self._capturing = False
        self._captured: Dict[int, torch.Tensor] = {}
        if self._gauss_newton:
            self._capture_hooks = [m.register_forward_hook(self._capture(j)) for j, m in modules.items()]
        self._built = True
        #: what the last step did: loss, |k| and |K dx| of each entry, the mean per-sample value factor
        #: 1 + B q_i . k of each entry but the first
        self.last_step: Dict[str, object] = {}

    def _count(self, j: int):
        def pre_hook(module, inputs):
            self._calls[j] = self._calls.get(j, 0) + 1
        return pre_hook

    def _capture(self, j: int):
        def forward_hook(module, inputs, output):
            if self._capturing:
                self._captured[j] = output
        return forward_hook

    def add_param_group(self, param_group: dict) -> None:
        """Refused after construction: the optimizer updates the entries of the Sequential it was built with."""
        if getattr(self, "_built", False):
            raise ValueError("pmp.nn.OCNOpt trains the entries of the Sequential it was built with; it cannot take "
                             "another param group. Train other parameters with their own optimizer")
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._solvers = {}  # rebuilt from the loaded factors (deterministically) at the next step

    # -- the iteration -----------------------------------------------------------------------
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        """One DDP iteration on the closure's batch; returns the loss before the step (as LBFGS does)."""
        if closure is None:
            raise TypeError("pmp.nn.OCNOpt.step needs a closure (like torch.optim.LBFGS): def closure(): "
                            "opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); return loss")
        settings = self.param_groups[0]
        lr = _positive("lr", settings["lr"])  # read at every step: a scheduler may set it
        damping = _positive("damping", settings["damping"])
        self._calls = {}
        recorders = [self._recorder] + ([self._module_recorder] if self._module_recorder is not None else [])
        with _recording(recorders):
            # the closure checks of pmp.nn.Optimizer (a scalar loss tensor), shared rather than repeated
            loss = _PMPOptimizer._evaluate(self, closure)
        twice = [j for j, calls in self._calls.items() if calls > 1]
        if twice:
            raise ValueError(
                f"pmp.nn.OCNOpt: a Linear / Conv2d ran {max(self._calls[j] for j in twice)} times in one forward pass "
                "(a layer reused inside an entry, e.g. the steps of an ODE solver): its Kronecker factors need one "
                "input per sample. Use curvature='exact' for such entries")
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"pmp.nn.OCNOpt: the closure's loss is {loss_value}; nothing to optimise")
        order = list(self._entries)
        before = [n - 1 for n in order[1:] if n - 1 not in self._entries]
        records = self._recorder.records(sorted(order + before))
        batch = _PMPOptimizer._check_records(self, records)
        _PMPOptimizer._check_costates(self, records, loss_value)
        module_records = (self._module_recorder.records(list(range(len(self._call_hooks))))
                          if self._module_recorder is not None else {})
        if self._gauss_newton:
            info = self._gauss_newton_pass(order, records, module_records, loss, batch, damping, settings)
            self._forward(order, records, info.pop("policies"), lr, batch, settings["feedback"], info)
            self.last_step = info
            return loss
        dtype, device = records[order[0]].costates.dtype, records[order[0]].costates.device
        scale = torch.ones(batch, dtype=dtype, device=device)  # C_i: V_x'^i = C_i * d loss / d x_(t+1)^i
        policies: Dict[int, object] = {}
        factors, j = {}, len(self._call_hooks)
        for n in reversed(order):  # the DDP backward pass: k, K and V_x entry by entry
            if n in self._kfac:
                mods = self._kfac[n]
                j -= len(mods)
                # the first entry's value factor scales nothing: its q_i . k is skipped (a convolution's worth)
                policy = self._kfac_policy(mods, [module_records[j + i] for i in range(len(mods))], scale, batch,
                                           damping, settings, value=n != order[0])
            else:
                value_grad = _per_sample(-scale, records[n].costates)  # V_x' [B, ...]
                policy = self._exact_policy(self._groups[n], records[n].inputs, value_grad, batch, damping, settings)
            policy["scale"] = scale  # C_i(t+1), for the feedback's r_i . dx^i
            policies[n] = policy
            if n != order[0]:  # the first entry's factor scales nothing (and is not computed with K-FAC)
                factors[n] = float(policy["value_factor"].mean())
            scale = scale * policy["value_factor"]
        info = {"loss": loss_value, "value_factor": factors, "k_norm": {}, "feedback_norm": {}}
        self._forward(order, records, policies, lr, batch, settings["feedback"], info)
        self.last_step = info
        return loss

    # -- the backward pass: k, the data of K, and the per-sample value factor -------------------
    def _kfac_policy(self, mods: List[_KFACModule], recs, scale: torch.Tensor, batch: int, damping: float,
                     settings, value: bool = True) -> dict:
        wd, decay = settings["weight_decay"], settings["stat_decay"]
        qk = scale.new_zeros(batch)
        parts = []
        for m, rec in zip(mods, recs):
            a = rec.inputs
            d = _per_sample(-scale, rec.costates)  # per-sample dQ/d(output) [B, ...] (-scale: one pass, not two)
            solve = self._factor_solver(m, lambda: m.factors(a, d, batch), damping + wd, decay, settings)
            gradient = m.gradient(a, d) + wd * m.matrix()  # Q_theta [out, K]
            k = -solve(gradient)
            if value:
                qk = qk + m.dots(a, d, k)  # q_i . k
            parts.append((m, a, d, k, solve))
        return {"kind": "kfac", "parts": parts, "value_factor": 1 + batch * qk, "decay": wd}

    def _factor_solver(self, m: "_KFACModule", factors: Callable[[], Tuple[torch.Tensor, torch.Tensor]],
                       shift: float, decay: float, settings) -> Callable:
        """The solver of (A (x) G + shift I) for module m: its running Kronecker factors, refreshed from
        ``factors()`` at the first step and every ``curvature_every`` steps (an exponential average with
        ``decay``), Cholesky-factored once per refresh or change of ``shift``."""
        state = self.state[m.module.weight]
        steps = int(state.get("steps", 0))
        if "A" not in state or steps % settings["curvature_every"] == 0:
            A, G = factors()
            if "A" in state and decay > 0:
                A = decay * state["A"] + (1 - decay) * A
                G = decay * state["G"] + (1 - decay) * G
            state["A"], state["G"] = A, G
            self._solvers.pop(m.name, None)
        state["steps"] = steps + 1
        key = (shift, state["A"].dtype)
        cached = self._solvers.get(m.name)
        if cached is None or cached[0] != key:  # Cholesky factors: once per curvature update
            cached = self._solvers[m.name] = (key, _kronecker_solver(state["A"], state["G"], shift))
        return cached[1]

    def _exact_policy(self, group: LayerGroup, x: torch.Tensor, value_grad: torch.Tensor, batch: int,
                      damping: float, settings) -> dict:
        wd = settings["weight_decay"]
        theta = group.parameters()[0]

        def sample_value(th, xi, vi):  # V_x'^i . f(x^i, theta): its theta-gradient is q_i
            return (vi * group.call(th, xi.unsqueeze(0))[0]).sum()

        with torch.no_grad():
            q = vmap(grad(sample_value), in_dims=(None, 0, 0))(theta, x, value_grad)  # [B, m]
        hessian = batch * q.T @ q
        hessian.diagonal().add_(damping + wd)
        chol = torch.linalg.cholesky(hessian)
        k = -torch.cholesky_solve((q.sum(0) + wd * theta)[:, None], chol)[:, 0]
        return {"kind": "exact", "q": q, "chol": chol, "k": k, "value_factor": 1 + batch * (q @ k)}

    # -- value_hessian="gauss-newton": V_xx^i = S_i S_i^T, the loss Hessian propagated back -------------
    def _gauss_newton_pass(self, order: List[int], records, module_records, loss: torch.Tensor, batch: int,
                           damping: float, settings) -> dict:
        """The DDP backward pass with the Gauss-Newton value Hessian; returns the step's info and its policies.

        At the model's output z the value Hessian of sample i is the loss Hessian, factored as
        H_i = S_i S_i^T (S_i: R directions). Gauss-Newton propagation V_xx <- f_x^T V_xx' f_x keeps the
        factor form with S(t) = f_x^T S(t+1): R back-propagated directions per sample, obtained from one
        extra forward pass and one batched backward pass (``is_grads_batched``). With q_ir = f_theta^i^T s_ir:

            Q_thetatheta = l_thetatheta + sum_ir q_ir q_ir^T + damping I      (DDPNOpt eq. 8, GN form)
            Q_thetax dx  = sum_ir q_ir (s_ir(t) . dx^i)
            V_x^i        = Q_x^i + (Q_xtheta k)_i = f_x^T V_x'^i + S_i(t) (S_i(t+1)^T f_theta^i k)

        so V_x^i = g_i + S_i U_i at every entry (g: the closure's back-propagated gradient), U_i [R] a running
        sum over the later entries. V_xx is the Gauss-Newton product alone (Q_xx; the term Q_xtheta K that
        couples the samples through Q_thetatheta^-1 is dropped).
        """
        first, last = order[0], len(self._model) - 1
        grad_out = -self._recorder.records([last])[last].costates  # d loss / d z [B, ...]
        outputs: Dict[int, torch.Tensor] = {}
        self._captured, self._capturing = {}, True
        try:
            with torch.enable_grad():  # the same entries at the same parameters: a graph for the directions
                h = records[first].inputs
                for n in range(first, last + 1):
                    h = outputs[n] = self._model[n](h)
        finally:
            self._capturing = False
        z = outputs[last]
        sqrt_z = _loss_sqrt_hessian(settings["loss"], z.detach(), grad_out, float(loss.detach()), batch)
        wanted = sorted(({n - 1 for n in order[1:]} | (set() if self._kfac else set(order))) - {last})
        modules = list(range(len(self._call_hooks))) if self._kfac else []
        targets = [outputs[n] for n in wanted] + [self._captured[j] for j in modules]
        # S(t) = f_x^T S(t+1) for all R directions in one batched backward pass (vmap over the directions)
        back = torch.autograd.grad(z, targets, sqrt_z, is_grads_batched=True, allow_unused=True) if targets else []
        back = [torch.zeros((sqrt_z.shape[0],) + t.shape, dtype=t.dtype, device=t.device) if b is None else b
                for b, t in zip(back, targets)]
        sqrt_out = dict(zip(wanted, back[:len(wanted)]))  # S at the output of entry n [R, B, ...]
        sqrt_out[last] = sqrt_z
        sqrt_mod = dict(zip(modules, back[len(wanted):]))
        del outputs, targets, z
        self._captured = {}

        shift = grad_out.new_zeros(batch, sqrt_z.shape[0])  # U_i: V_x^i = g_i + S_i U_i
        policies: Dict[int, object] = {}
        shifts: Dict[int, torch.Tensor] = {}
        j = len(self._call_hooks)
        for n in reversed(order):
            value = n != first  # the first entry's V_x moves nothing
            if n in self._kfac:
                mods = self._kfac[n]
                j -= len(mods)
                ids = range(j, j + len(mods))
                policy = self._kfac_gn_policy(mods, [module_records[i] for i in ids], [sqrt_mod[i] for i in ids],
                                              shift, batch, damping, settings, value)
            else:
                policy = self._exact_gn_policy(self._groups[n], records[n].inputs, -records[n].costates,
                                               sqrt_out[n], shift, damping, settings)
            if value:
                policy["sqrt_in"] = sqrt_out[n - 1]  # S(t) at the entry's input, for Q_thetax dx
                shifts[n] = policy["value_shift"].norm(dim=1).mean()
                shift = shift + policy["value_shift"]
            policies[n] = policy
        return {"loss": float(loss.detach()), "value_shift": {n: float(v) for n, v in shifts.items()},
                "k_norm": {}, "feedback_norm": {}, "policies": policies}

    def _kfac_gn_policy(self, mods: List[_KFACModule], recs, sqrts: List[torch.Tensor], shift: torch.Tensor,
                        batch: int, damping: float, settings, value: bool) -> dict:
        """K-FAC with the Gauss-Newton G: sum_ir q_ir q_ir^T ~ A (x) G, G = (1/P) sum_ipr s s^T."""
        wd, decay = settings["weight_decay"], settings["stat_decay"]
        u = shift.new_zeros(shift.shape)
        parts = []
        for m, rec, sqrt in zip(mods, recs, sqrts):
            a = rec.inputs
            d = _combine(shift, sqrt) - rec.costates  # V_x' at the module's output: g + S U [B, ...]

            def factors(a=a, sqrt=sqrt):  # A and the Gauss-Newton G = (1/P) sum_ipr s s^T
                A, positions = m.input_factor(a, batch)
                return A, m.output_sum(sqrt.reshape((-1,) + sqrt.shape[2:])) / positions

            solve = self._factor_solver(m, factors, damping + wd, decay, settings)
            k = -solve(m.gradient(a, d) + wd * m.matrix())  # k = -Q_thetatheta^-1 Q_theta
            if value:
                u = u + _directions_dot(sqrt, m.output(a, k))  # S_i(t+1)^T f_theta^i k [B, R]
            parts.append((m, a, d, sqrt, k, solve))
        return {"kind": "kfac-gn", "parts": parts, "value_shift": u, "decay": wd}

    def _exact_gn_policy(self, group: LayerGroup, x: torch.Tensor, value_grad: torch.Tensor, sqrt: torch.Tensor,
                         shift: torch.Tensor, damping: float, settings) -> dict:
        """The dense block sum_ir q_ir q_ir^T from per-sample vector-Jacobian products (one forward a sample)."""
        wd = settings["weight_decay"]
        theta = group.parameters()[0]
        cotangents = torch.cat([(value_grad + _combine(shift, sqrt))[:, None], sqrt.transpose(0, 1)], 1)

        def sample_grads(xi, ci):  # [1 + R, m]: f_theta^i^T V_x'^i and f_theta^i^T s_ir
            _, pull = vjp(lambda th: group.call(th, xi.unsqueeze(0))[0], theta)
            return vmap(pull)(ci)[0]

        with torch.no_grad():
            q = vmap(sample_grads)(x, cotangents)  # [B, 1 + R, m]
        qs = q[:, 1:]
        hessian = torch.einsum("brm,brn->mn", qs, qs)
        hessian.diagonal().add_(damping + wd)
        chol = torch.linalg.cholesky(hessian)
        k = -torch.cholesky_solve((q[:, 0].sum(0) + wd * theta)[:, None], chol)[:, 0]
        return {"kind": "exact-gn", "q": qs, "chol": chol, "k": k, "value_shift": qs @ k}

    # -- the forward pass: theta_t + lr (k_t + K_t dx_t) -----------------------------------------
    def _forward(self, order, records, policies, lr: float, batch: int, feedback: bool, info: dict) -> None:
        first = order[0]
        x = records[first].inputs  # nothing before the first entry with parameters moves: dx_first = 0
        last = order[-1]
        with torch.no_grad():
            for n in range(first, last + 1):
                entry = self._model[n]
                if n not in policies:
                    if feedback:
                        x = entry(x)
                    continue
                policy = policies[n]
                weights = None
                if feedback and n != first and "sqrt_in" in policy:
                    # S_i(t)^T dx^i [B, R]: Q_thetax dx = sum_i f_theta^i^T S_i(t+1) S_i(t)^T dx^i (eq. 8, GN form)
                    dx = x - records[n].inputs
                    weights = _directions_dot(policy["sqrt_in"], dx)
                elif feedback and n != first:
                    # r_i . dx^i = V_x'^i . f_x dx^i = C_i(t+1) (d loss / d x_t^i) . dx^i: back-propagation
                    # already carried the recorded gradient through the entry (f_x^T), no Jacobian product here
                    dx = x - records[n].inputs
                    weights = -(records[n - 1].costates * dx).reshape(batch, -1).sum(1) * policy["scale"]
                self._update(policy, lr, batch, weights, info, n)
                if feedback and n != last:
                    x = entry(x)

    def _update(self, policy: dict, lr: float, batch: int, weights: Optional[torch.Tensor], info: dict,
                n: int) -> None:
        if policy["kind"] == "kfac-gn":
            k_sq, fb_sq = 0.0, 0.0
            for m, a, d, sqrt, k, solve in policy["parts"]:
                step = k
                k_sq += float((k * k).sum())
                if weights is not None:
                    # k + K dx = -Q_thetatheta^-1 (Q_theta + Q_thetax dx): the gradient of (V_x' + S w) . f
                    step = -solve(m.gradient(a, d + _combine(weights, sqrt)) + policy["decay"] * m.matrix())
                    fb_sq += float(((step - k) ** 2).sum())
                m.add(lr * step)
        elif policy["kind"] == "exact-gn":
            group, step = self._groups[n], policy["k"]
            k_sq, fb_sq = float((step * step).sum()), 0.0
            if weights is not None:
                rhs = torch.einsum("brm,br->m", policy["q"], weights)  # Q_thetax dx
                gain = -torch.cholesky_solve(rhs[:, None], policy["chol"])[:, 0]
                fb_sq = float((gain * gain).sum())
                step = step + gain
            group.assign((group.parameters()[0] + lr * step)[None])
        elif policy["kind"] == "kfac":
            k_sq, fb_sq = 0.0, 0.0
            for m, a, d, k, solve in policy["parts"]:
                step = k
                k_sq += float((k * k).sum())
                if weights is not None:
                    # k + K dx = -Q_thetatheta^-1 (l_theta + sum_i (1 + B r_i . dx^i) q_i): one weighted gradient
                    weighted = m.gradient(a, _per_sample(1 + batch * weights, d))
                    step = -solve(weighted + policy["decay"] * m.matrix())
                    fb_sq += float(((step - k) ** 2).sum())
                m.add(lr * step)
        else:
            group, step = self._groups[n], policy["k"]
            k_sq, fb_sq = float((step * step).sum()), 0.0
            if weights is not None:
                gain = -torch.cholesky_solve((batch * policy["q"].T @ weights)[:, None], policy["chol"])[:, 0]
                fb_sq = float((gain * gain).sum())
                step = step + gain
            group.assign((group.parameters()[0] + lr * step)[None])
        info["k_norm"][n] = math.sqrt(k_sq)
        info["feedback_norm"][n] = math.sqrt(fb_sq)


def _per_sample(scale: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """scale [B] times t [B, ...]."""
    return t * scale.reshape((-1,) + (1,) * (t.ndim - 1)).to(t.dtype)


def _directions_dot(sqrt: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """s_ir . v_i [B, R] of directions sqrt [R, B, ...] and v [B, ...]."""
    return (sqrt * v.unsqueeze(0)).reshape(sqrt.shape[0], sqrt.shape[1], -1).sum(-1).T


def _combine(w: torch.Tensor, sqrt: torch.Tensor) -> torch.Tensor:
    """sum_r w_ir s_ir [B, ...] of weights w [B, R] and directions sqrt [R, B, ...]."""
    return (w.T.reshape(w.shape[1], w.shape[0], *(1,) * (sqrt.ndim - 2)).to(sqrt.dtype) * sqrt).sum(0)


def _loss_sqrt_hessian(loss: str, z: torch.Tensor, grad_z: torch.Tensor, loss_value: float,
                       batch: int) -> torch.Tensor:
    """Factors S [R, B, ...] of the loss Hessian at the model's output z [B, ...]: H_i = sum_r s_ir s_ir^T.

    Checked against the closure's loss and gradient, so that a loss other than the one named is refused
    rather than given a wrong curvature.
    """
    shape = tuple(z.shape[1:])
    if loss == "mse":
        per = z[0].numel()
        # mse_loss's mean over B * per entries: grad = 2 (z - y) / (B per), so loss = (B per / 4) |grad|^2
        implied = float((grad_z * grad_z).sum()) * batch * per / 4
        if not math.isclose(implied, loss_value, rel_tol=1e-3, abs_tol=1e-12):
            raise ValueError(
                f"pmp.nn.OCNOpt: loss='mse' takes torch.nn.functional.mse_loss(model(x), y) (the mean over all "
                f"{batch} x {per} output entries, nothing added), but the closure's loss {loss_value:.6g} and its "
                f"gradient at the model's output imply {implied:.6g} for that loss. Compute the loss as "
                "mse_loss(model(x), y) (put any reduction of the output, e.g. a sum, into the model as a last "
                "entry) and the L2 term as weight_decay")
        eye = torch.eye(per, dtype=z.dtype, device=z.device).reshape((per, 1) + shape)
        return (eye * math.sqrt(2.0 / (batch * per))).expand((per, batch) + shape).contiguous()
    if z.ndim != 2:
        raise ValueError(f"pmp.nn.OCNOpt: loss='cross_entropy' takes logits [B, C] from the model, got an output "
                         f"of shape {tuple(z.shape)}")
    p = torch.softmax(z, -1)
    labels = p - batch * grad_z  # cross_entropy's mean: grad = (p - y) / B, so y = p - B grad
    off = torch.maximum(-labels.min(), (labels.sum(-1) - 1).abs().max())
    if bool(off > 1e-3):
        raise ValueError(
            f"pmp.nn.OCNOpt: loss='cross_entropy' takes torch.nn.functional.cross_entropy(model(x), labels) (the "
            f"batch mean, nothing added), but the closure's gradient at the model's output is not (softmax - "
            f"target) / B for any target distribution (off by {float(off):.3g}). Compute the loss that way and "
            "the L2 term as weight_decay")
    # diag(p) - p p^T = sum_c s_c s_c^T with s_c = sqrt(p_c) (e_c - p); the batch mean adds 1/B
    eye = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
    return (eye[:, None, :] - p[None]) * (p.T.sqrt() / math.sqrt(batch))[:, :, None]


def _kronecker_solver(A: torch.Tensor, G: torch.Tensor, damping: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """M -> (G + lambda_G I)^-1 M (A + lambda_A I)^-1 for M [out, K]: (A (x) G + lambda I)^-1 approximately.

    The damping lambda is split as lambda_A = pi sqrt(lambda), lambda_G = sqrt(lambda) / pi with
    pi^2 = (tr A / dim A) / (tr G / dim G) (Martens and Grosse 2015, sec. 6.3): the factored Tikhonov term.
    """
    tr_a = float(A.diagonal().mean())
    tr_g = float(G.diagonal().mean())
    pi = math.sqrt(tr_a / tr_g) if tr_a > 0 and tr_g > 0 else 1.0
    root = math.sqrt(damping)
    a = A.clone()
    a.diagonal().add_(pi * root)
    g = G.clone()
    g.diagonal().add_(root / pi)
    chol_a, chol_g = torch.linalg.cholesky(a), torch.linalg.cholesky(g)

    def solve(M: torch.Tensor) -> torch.Tensor:
        left = torch.cholesky_solve(M, chol_g)  # G^-1 M
        return torch.cholesky_solve(left.T, chol_a).T  # (A^-1 (G^-1 M)^T)^T, A symmetric
    return solve


def _kfac_modules(n: int, entry: torch.nn.Module) -> List[_KFACModule]:
    """The Linear / Conv2d modules of entry n; any other module with parameters is refused."""
    mods, seen = [], set()
    for name, module in entry.named_modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        full = f"{n}.{name}" if name else str(n)
        if not isinstance(module, KFAC_LAYERS):
            raise ValueError(
                f"pmp.nn.OCNOpt: entry {n} has a {type(module).__name__} ({full}) with parameters; curvature='kfac' "
                "has Kronecker factors for Linear and Conv2d only. Use curvature='exact' (dense Gauss-Newton "
                "blocks, entries up to 4096 parameters) or train this model with pmp.nn.EMSA")
        if isinstance(module, torch.nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"
                                                    or isinstance(module.padding, str)):
            raise ValueError(f"pmp.nn.OCNOpt: the Conv2d {full} has groups={module.groups}, padding="
                             f"{module.padding!r}, padding_mode={module.padding_mode!r}; the Kronecker factors "
                             "take groups=1 and numeric zero padding. Use curvature='exact' for this entry")
        trainable = [p.requires_grad for p in own]
        if not any(trainable):
            continue
        if not all(trainable):
            raise ValueError(f"pmp.nn.OCNOpt: {full} has a frozen and a trainable parameter; freeze both or neither")
        if any(id(p) in seen for p in own):
            raise ValueError(f"pmp.nn.OCNOpt: a parameter of {full} is shared with another layer of entry {n}; "
                             "each Linear / Conv2d needs its own parameters")
        seen.update(id(p) for p in own)
        mods.append(_KFACModule(module, full))
    return mods


class _recording:
    """Several ``CostateRecorder.recording()`` contexts at once."""

    def __init__(self, recorders):
        self._contexts = [r.recording() for r in recorders]

    def __enter__(self):
        for c in self._contexts:
            c.__enter__()
        return self

    def __exit__(self, *exc):
        for c in reversed(self._contexts):
            c.__exit__(*exc)
        return False


def _positive(label: str, value) -> float:
    """``value`` as a finite float > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"`{label}` must be a finite number > 0, got {value!r}")
    return float(value)
