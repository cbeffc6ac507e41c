"""The GPU against the CPU, side by side: reference problems, the sine study, a CNN training step.

On a machine with CUDA every case runs on the GPU and on the CPU in the same process
(median of --repeats; the first call on each device is a warm-up) and the script prints
and saves the times and their ratio. The code path is the library's own (``device=``),
so this script runs unchanged wherever torch sees a GPU. Without one it says so, saves
that fact and exits 0.

    python scripts/bench_gpu.py [--repeats 3] [--out results/bench]
"""
from __future__ import annotations

import torch

import harness
import pmpsolve as pmp
from problems import REFERENCE_PROBLEMS


def median_seconds(fn, device: str, repeats: int) -> float:
    """After a warm-up (kernels, allocator, vmap tracing); on a GPU every clock reading waits for the device."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    return harness.timed(fn, repeats=repeats, sync=sync).median


def reference_case(name, make, mesh):
    problem, _ = make()

    def run(device):
        return lambda: pmp.solve(problem, mesh=mesh, device=device, stop=pmp.Stop(max_iter=10))
    return f"{name} (mesh {mesh}, 10 E-MSA iterations)", run


def sine_case(samples):
    from problems.sine import sine, sine_initial_controls

    problem, _ = sine(samples, reg=0.001)

    def run(device):
        init = sine_initial_controls("good", 20)
        # the sine study's E-MSA settings (pmpsolve/studies/sine.py)
        return lambda: pmp.solve(problem, method=pmp.EMSA(rho=0.25), mesh=20, init=init, device=device,
                                 ode=pmp.ODE(rtol=1e-6, atol=1e-8),
                                 maximiser=pmp.Maximiser(iterations=10, perturb=0.005, seed=0),
                                 stop=pmp.Stop(max_iter=5, tol=0.0))
    return f"sine network (K = {samples} samples, 5 E-MSA iterations, the study's settings)", run


def cnn_case(batch):
    from problems.cnn import cross_entropy, residual_cnn

    def run(device):
        g = torch.Generator().manual_seed(0)
        x = torch.rand(batch, 1, 28, 28, generator=g).to(device)
        y = torch.randint(0, 10, (batch,), generator=g).to(device)
        model = residual_cnn(seed=0).to(device)
        opt = pmp.nn.EMSA(model, rho=0.03)

        def closure():
            opt.zero_grad()
            loss = cross_entropy(model(x), y)
            loss.backward()
            return loss
        return lambda: opt.step(closure)
    return f"CNN E-MSA step (batch {batch}, rho 0.03)", run


def main(argv=None):
    parser = harness.parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mesh", type=int, default=200)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--samples", type=int, default=10000, help="samples of the sine network case")
    args = harness.parse(parser, argv, quick=dict(repeats=1, mesh=20, batch=8, samples=100))
    path = args.out / "bench_gpu.json"
    if not torch.cuda.is_available():
        message = (f"no CUDA device is visible to torch {torch.__version__} (torch.cuda.is_available() is False): "
                   "nothing to compare. On a machine with a GPU this script runs every case on both devices.")
        print(message)
        harness.write_json(path, {"cuda": False, "torch": torch.__version__, "message": message})
        return
    cases = [reference_case(name, make, args.mesh) for name, make in REFERENCE_PROBLEMS.items()]
    cases.append(sine_case(args.samples))
    cases.append(cnn_case(args.batch))
    rows = []
    print(f"GPU: {torch.cuda.get_device_name(0)}; CPU threads: {torch.get_num_threads()}")
    print(f"{'case':55s} {'CPU [s]':>9s} {'GPU [s]':>9s} {'CPU/GPU':>8s}")
    for label, make in cases:
        cpu = median_seconds(make("cpu"), "cpu", args.repeats)
        gpu = median_seconds(make("cuda"), "cuda", args.repeats)
        rows.append({"case": label, "cpu_s": cpu, "gpu_s": gpu, "speedup": cpu / gpu})
        print(f"{label:55s} {cpu:9.3f} {gpu:9.3f} {cpu / gpu:8.2f}")
    harness.write_json(path, {"cuda": True, "device": torch.cuda.get_device_name(0), "rows": rows})


if __name__ == "__main__":
    main()
