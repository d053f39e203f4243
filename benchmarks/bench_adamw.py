"""AdamW step: peftkern's PagedAdamW (32-bit and 8-bit states) against torch.optim.AdamW and
bitsandbytes' AdamW8bit, on the same parameters and gradients.

* measured-cpu: optimizer state bytes (summed over the state tensors after a step) and step time
  (interleaved medians, one torch thread: on this shared 2-core machine, two OpenMP threads make
  every multi-op step wait on the other tenants and the medians meaningless), fp32 parameters.
* modeled-h100: bytes each step moves per parameter: our Triton kernels counted under the
  interpreter vs torch's fused AdamW (one aten op, its inputs and outputs), extrapolated linearly
  in the parameter count (every launch is elementwise or per 256-element block).
* static: registers, spills, shared memory of every AdamW kernel config on sm_80 and sm_90.
* measured-gpu: CUDA events, every face against torch's fused AdamW (skipped without CUDA).
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import static, traffic
from benchmarks.harness import pick, spread

# A stack of projection-sized matrices plus the small vectors (biases, norms) a model carries.
CPU_SHAPES = pick(full=[[(1024, 2816)] * 4 + [(2816,)] * 4 + [(1024,)] * 4],
                  quick=[[(64, 300)] * 2 + [(300,)]])
CPU_ROUNDS = pick(9, 3)
CPU_THREADS = 1
IMPLS = ("ours8", "ours32", "torch", "torch_fused", "bnb8")
PEER_NAMES = {"torch": "torch.optim.AdamW (for-each loop, default)", "torch_fused": "torch.optim.AdamW(fused=True)",
              "bnb8": "bitsandbytes AdamW8bit"}
# modeled: counted at two parameter counts (interpreter), extrapolated affinely to GPU-scale counts
COUNT_NUMELS = pick((8 * 1024, 16 * 1024), (512, 1024))
MODELED_PARAMS = (1_000_000_000, 8_000_000_000)


def _case(shapes) -> str:
    params = sum(torch.Size(s).numel() for s in shapes)
    return f"{len(shapes)} tensors, {params / 1e6:.2f}M params"


def _shape(shapes) -> dict:
    return {"tensors": len(shapes), "params": sum(torch.Size(s).numel() for s in shapes),
            "largest": list(max(shapes, key=lambda s: torch.Size(s).numel()))}


def build_optimizer(impl: str, shapes, device="cpu", seed=0):
    """Parameters of ``shapes`` with fixed random gradients and the optimizer ``impl`` over them;
    returns (optimizer, params)."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device)
    if impl == "ours8":
        from peftkern.optim import PagedAdamW

        opt = PagedAdamW(params, optim_bits=8, paged=False)
    elif impl == "ours32":
        from peftkern.optim import PagedAdamW

        opt = PagedAdamW(params, optim_bits=32, paged=False)
    elif impl == "torch":
        opt = torch.optim.AdamW(params, weight_decay=0.01)
    elif impl == "torch_fused":
        opt = torch.optim.AdamW(params, weight_decay=0.01, fused=True)
    elif impl == "bnb8":
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, weight_decay=0.01)
    else:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return opt, params


def _state_bytes(opt) -> int:
    """Bytes of every tensor in the optimizer's per-parameter state (shared quantization maps,
    which bitsandbytes keeps by reference in each state, counted once)."""
    seen, total = set(), 0
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                total += value.numel() * value.element_size()
    return total


def _available(impl) -> bool:
    if impl != "bnb8":
        return True
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("shapes", CPU_SHAPES, ids=lambda s: f"{len(s)}tensors")
def test_state_bytes_cpu(shapes, record):
    sizes = {}
    for impl in IMPLS:
        if not _available(impl):
            continue
        opt, _ = build_optimizer(impl, shapes)
        opt.step()
        sizes[impl] = _state_bytes(opt)
    mib = 2.0 ** 20
    params = _shape(shapes)["params"]
    common = dict(kind="measured-cpu", case=_case(shapes), shape=_shape(shapes), dtype="float32",
                  metric="optimizer state bytes", unit="MiB", peer=sizes["torch"] / mib,
                  peer_name=PEER_NAMES["torch"])
    record(**common, ours=sizes["ours8"] / mib, target="<= 0.26",
           note=f"8-bit; {sizes['ours8'] / params:.3f} B/param (tensors < 4096 elements keep 32-bit states)")
    record(**common, ours=sizes["ours32"] / mib, note="32-bit")
    if "bnb8" in sizes:
        record(kind="measured-cpu", case=_case(shapes), shape=_shape(shapes), dtype="float32",
               metric="optimizer state bytes", unit="MiB", ours=sizes["ours8"] / mib, peer=sizes["bnb8"] / mib,
               peer_name=PEER_NAMES["bnb8"], note=f"bnb {sizes['bnb8'] / params:.3f} B/param")


@pytest.mark.parametrize("shapes", CPU_SHAPES, ids=lambda s: f"{len(s)}tensors")
def test_time_cpu(shapes, timer, record):
    threads = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    try:
        optimizers = {impl: build_optimizer(impl, shapes)[0] for impl in IMPLS if _available(impl)}
        medians = timer({impl: opt.step for impl, opt in optimizers.items()}, rounds=CPU_ROUNDS)
    finally:
        torch.set_num_threads(threads)
    ms = {impl: 1e3 * s for impl, s in medians.items()}
    noise = ", ".join(f"{k} IQR/median {spread(s):.0%}" for k, s in timer.samples.items())
    note = f"torch face, {CPU_THREADS} torch thread; {CPU_ROUNDS} interleaved rounds; {noise}"
    common = dict(kind="measured-cpu", case=_case(shapes), shape=_shape(shapes), dtype="float32", metric="step time",
                  unit="ms", note=note)
    for ours, peer in (("ours8", "torch"), ("ours8", "bnb8"), ("ours32", "torch"), ("ours32", "torch_fused")):
        if peer in ms:
            record(**common, ours=ms[ours], peer=ms[peer], peer_name=PEER_NAMES[peer], ours_kind=ours,
                   target="<= 1.0" if peer == "bnb8" else None)


def _count_ours(bits: int, numel: int) -> traffic.Count:
    from peftkern import backend
    from peftkern.optim import PagedAdamW

    p = torch.nn.Parameter(torch.randn(numel))
    p.grad = torch.randn(numel)
    opt = PagedAdamW([p], optim_bits=bits, paged=False, min_8bit_size=0)
    opt.step()  # states exist before counting

    def step():
        with backend.use("triton"):
            opt.step()

    return traffic.count_triton(step)


def _count_torch_fused(numel: int) -> traffic.Count:
    """torch's fused AdamW, one aten op on meta tensors; it returns nothing and updates its
    arguments in place, so what it writes is taken from the arguments its schema marks mutated."""
    p = torch.nn.Parameter(torch.empty(numel, device="meta"))
    p.grad = torch.empty(numel, device="meta")
    m, v = torch.empty(numel, device="meta"), torch.empty(numel, device="meta")
    step = torch.tensor(1.0, device="meta")
    args = ([p], [p.grad], [m], [v], [], [step])
    count = traffic.count_eager(lambda: torch._fused_adamw_(*args, lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.01,
                                                            eps=1e-8, amsgrad=False, maximize=False))
    schema = torch.ops.aten._fused_adamw_.default._schema
    for argument, value in zip(schema.arguments, args):
        # grads are marked mutable for unscaling with grad_scale, which is not used here
        if argument.alias_info is not None and argument.alias_info.is_write and argument.name in (
                "self", "exp_avgs", "exp_avg_sqs"):
            count.launches[-1].written += sum(traffic.footprint(t) for t in value)
            count.launches[-1].raw_written += sum(traffic.footprint(t) for t in value)
    return count


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts Triton kernels in the CPU interpreter")
def test_modeled_h100(record):
    roofline = traffic.H100_SXM
    small, large = COUNT_NUMELS
    counted = {"ours8": [_count_ours(8, n) for n in COUNT_NUMELS], "ours32": [_count_ours(32, n) for n in COUNT_NUMELS],
               "torch": [_count_torch_fused(n) for n in COUNT_NUMELS]}
    for params in MODELED_PARAMS:
        at = {k: traffic.extrapolate(c[0], c[1], small, large, params) for k, c in counted.items()}
        model = (f"{roofline.describe()}; counted at {small} and {large} fp32 parameters (ours: Triton under the "
                 f"interpreter plus the aten ops of the step, distinct bytes; torch: _fused_adamw_ reads and "
                 f"in-place writes) and extrapolated affinely in the parameter count")
        common = dict(kind="modeled-h100", case=f"step, {params / 1e9:g}B fp32 params", shape={"params": params},
                      dtype="float32", model=model, peer_name=PEER_NAMES["torch_fused"])
        for name in ("ours8", "ours32"):
            record(**common, metric="bytes moved per step", unit="GB", ours=at[name].bytes / 1e9,
                   peer=at["torch"].bytes / 1e9, ours_kind=name,
                   note=f"modeled; {at[name].bytes / params:.2f} B/param vs {at['torch'].bytes / params:.2f}")
            record(**common, metric="step time", unit="ms", ours=at[name].time(roofline) * 1e3,
                   peer=at["torch"].time(roofline) * 1e3, ours_kind=name, launches=len(at[name].launches),
                   note="modeled")


def test_static_kernels(record):
    reports = static.kernel_reports("peftkern.ops.adamw", archs=pick(("sm_80", "sm_90"), ("sm_80",)),
                                    limit=pick(None, 1))
    for rep in reports:
        record(kind="static", case=f"{rep['kernel']} {rep['config']} {rep['arch']}", shape={},
               dtype=rep["config"].split()[0], metric="registers per thread", ours=rep["registers"], peer=None,
               peer_name=None, unit="registers", spill_bytes=rep["spill_bytes"], shared_bytes=rep["shared_bytes"],
               ok=rep["ok"], arch=rep["arch"], note=rep.get("error", ""))
    assert reports


def _cuda_ms(fn, rounds=20) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    samples = []
    for _ in range(rounds):
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return sorted(samples)[len(samples) // 2]


@pytest.mark.gpu
@pytest.mark.parametrize("params", [64 * 2 ** 20, 256 * 2 ** 20], ids=lambda n: f"{n >> 20}M")
def test_gpu(params, record):
    from peftkern import backend

    shapes = [(params // 4096, 4096)]
    fused, _ = build_optimizer("torch_fused", shapes, device="cuda")
    peer_ms = _cuda_ms(fused.step)
    for bits in (8, 32):
        opt, _ = build_optimizer(f"ours{bits}", shapes, device="cuda")
        for face in ("triton", "cuda"):
            if backend.why_unavailable(face, "cuda") is not None:
                continue
            with backend.use(face):
                ours_ms = _cuda_ms(opt.step)
            record(kind="measured-gpu", case=f"{bits}-bit step, {params >> 20}M fp32 params", shape={"params": params},
                   dtype="float32", metric="step time", unit="ms", ours=ours_ms, peer=peer_ms,
                   peer_name=PEER_NAMES["torch_fused"], face=face, device=torch.cuda.get_device_name(),
                   mem_gib=torch.cuda.max_memory_allocated() / 2 ** 30)


# -- EWC / L2-SP folded into the step (issue 19) -------------------------------------------------------
EWC_LAMBDA = 10.0
EWC_IMPLS = ("plain32", "fused_ewc32", "autograd_ewc32", "plain8", "fused_ewc8", "autograd_ewc8")
EWC_THREADS = pick((1, 2), (1,))


def build_ewc(impl: str, shapes, device="cpu", seed=0, dtype=torch.float32, fisher_bits=None):
    """(step function, optimizer) for an EWC contender: ``plain*`` steps without the penalty,
    ``fused_ewc*`` with it folded into PagedAdamW's step (F in ``fisher_bits``, default: fp32 F for
    32-bit states, 8-bit F for 8-bit ones), ``autograd_ewc*`` computes lam/2 sum F (p - p*)^2 by
    autograd (its backward adds into the gradients, as in a training step's loss) and then takes the
    plain step. Parameters in ``dtype``."""
    from peftkern.optim import PagedAdamW

    bits = 8 if impl.endswith("8") else 32
    fisher_bits = fisher_bits or bits
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype)) for s in shapes]
    anchors = [p.detach() + 0.01 * torch.randn(p.shape, generator=gen).to(device) for p in params]
    fishers = [torch.rand(p.shape, generator=gen).to(device) * 1e-3 for p in params]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device, dtype)
    fused = impl.startswith("fused")
    opt = PagedAdamW(params, optim_bits=bits, paged=False, min_8bit_size=0, anchor_lambda=EWC_LAMBDA if fused else 0.0)
    if fused:
        for p, a, f in zip(params, anchors, fishers):
            opt.set_anchor(p, a, f, fisher_bits=fisher_bits)
    if not impl.startswith("autograd"):
        return opt.step, opt

    def step():
        penalty = sum((f * (p - a) ** 2).sum() for p, a, f in zip(params, anchors, fishers))
        (EWC_LAMBDA / 2 * penalty).backward()
        opt.step()

    return step, opt


@pytest.mark.parametrize("threads", EWC_THREADS, ids=lambda t: f"{t}thread")
@pytest.mark.parametrize("shapes", CPU_SHAPES, ids=lambda s: f"{len(s)}tensors")
def test_ewc_time_cpu(shapes, threads, timer, record):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        steps = {impl: build_ewc(impl, shapes)[0] for impl in EWC_IMPLS}
        medians = timer(steps, rounds=CPU_ROUNDS)
    finally:
        torch.set_num_threads(before)
    ms = {impl: 1e3 * s for impl, s in medians.items()}
    noise = ", ".join(f"{k} IQR/median {spread(s):.0%}" for k, s in timer.samples.items())
    note = f"torch face, {threads} torch thread(s); {CPU_ROUNDS} interleaved rounds; {noise}"
    for bits in (32, 8):
        common = dict(kind="measured-cpu", case=f"EWC {bits}-bit step, {_case(shapes)}, {threads} thread(s)",
                      shape={**_shape(shapes), "threads": threads}, dtype="float32", metric="step time", unit="ms",
                      ours=ms[f"fused_ewc{bits}"], ours_kind=f"fused_ewc{bits}", note=note)
        record(**common, peer=ms[f"plain{bits}"], peer_name=f"the plain {bits}-bit step (no penalty)",
               target="<= 1.2")
        record(**common, peer=ms[f"autograd_ewc{bits}"], peer_name=f"autograd penalty + the plain {bits}-bit step")


def _count_ewc_fused(bits: int, numel: int, dtype=torch.float32, fisher_bits=None) -> traffic.Count:
    from peftkern import backend

    step, opt = build_ewc(f"fused_ewc{bits}", [(numel,)], dtype=dtype, fisher_bits=fisher_bits)
    step()  # states exist before counting

    def counted():
        with backend.use("triton"):
            step()

    return traffic.count_triton(counted)


def _count_plain(bits: int, numel: int, dtype) -> traffic.Count:
    from peftkern import backend

    step, _ = build_ewc(f"plain{bits}", [(numel,)], dtype=dtype)
    step()

    def counted():
        with backend.use("triton"):
            step()

    return traffic.count_triton(counted)


def _count_autograd_penalty(numel: int, dtype=torch.float32) -> traffic.Count:
    """The separate penalty's forward and backward (aten ops on meta tensors), gradient accumulated
    into an existing .grad as in a training step."""
    p = torch.nn.Parameter(torch.empty(numel, device="meta", dtype=dtype))
    p.grad = torch.empty(numel, device="meta", dtype=dtype)
    a, f = torch.empty(numel, device="meta", dtype=dtype), torch.empty(numel, device="meta")

    def penalty():
        (EWC_LAMBDA / 2 * (f * (p - a) ** 2).sum()).backward()

    return traffic.count_eager(penalty)


# (state bits, parameter dtype, F bits)
EWC_MODELED = ((32, torch.float32, 32), (8, torch.float32, 8), (32, torch.bfloat16, 8))


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts Triton kernels in the CPU interpreter")
@pytest.mark.parametrize("bits, dtype, fisher_bits", EWC_MODELED, ids=lambda v: str(v).replace("torch.", ""))
def test_ewc_modeled_h100(bits, dtype, fisher_bits, record):
    roofline = traffic.H100_SXM
    small, large = COUNT_NUMELS
    params = MODELED_PARAMS[0]
    fused = traffic.extrapolate(*[_count_ewc_fused(bits, n, dtype, fisher_bits) for n in COUNT_NUMELS], small, large,
                                params)
    plain = traffic.extrapolate(*[_count_plain(bits, n, dtype) for n in COUNT_NUMELS], small, large, params)
    pen = traffic.extrapolate(*[_count_autograd_penalty(n, dtype) for n in COUNT_NUMELS], small, large, params)
    separate = traffic.Count(launches=pen.launches + plain.launches)
    t = str(dtype).replace("torch.", "")
    model = (f"{roofline.describe()}; ours: Triton under the interpreter (distinct bytes) at {small} and {large} "
             f"parameters, extrapolated affinely; the separate penalty: its aten ops (forward and backward, on meta "
             f"tensors) plus our plain step")
    common = dict(kind="modeled-h100", case=f"EWC step, {bits}-bit states, {t} params, {fisher_bits}-bit F, "
                  f"{params / 1e9:g}B params", shape={"params": params, "state_bits": bits, "fisher_bits": fisher_bits},
                  dtype=t, model=model, ours_kind=f"fused_ewc{bits}")
    per = {k: c.bytes / params for k, c in (("fused", fused), ("plain", plain), ("separate", separate))}
    note = f"modeled; B/param: fused {per['fused']:.2f}, plain {per['plain']:.2f}, separate {per['separate']:.2f}"
    record(**common, metric="bytes moved per step", unit="GB", ours=fused.bytes / 1e9, peer=plain.bytes / 1e9,
           peer_name=f"the plain {bits}-bit step", note=note)
    record(**common, metric="bytes moved per step", unit="GB", ours=fused.bytes / 1e9, peer=separate.bytes / 1e9,
           peer_name=f"autograd penalty + the plain {bits}-bit step", note=note)
    record(**common, metric="step time", unit="ms", ours=fused.time(roofline) * 1e3, peer=plain.time(roofline) * 1e3,
           peer_name=f"the plain {bits}-bit step", target="<= 1.2", note="modeled")
    record(**common, metric="step time", unit="ms", ours=fused.time(roofline) * 1e3,
           peer=separate.time(roofline) * 1e3, peer_name=f"autograd penalty + the plain {bits}-bit step",
           note="modeled", launches=len(separate.launches))
