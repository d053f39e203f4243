"""PagedAdamW: AdamW with 32-bit or 8-bit blockwise states, optionally paged to host memory.

    opt = PagedAdamW(model.parameters(), lr=2e-4, optim_bits=8)   # 2 bytes of state per parameter
    loss.backward(); opt.step(); opt.zero_grad()

The update is torch.optim.AdamW's (decoupled weight decay, bias correction). With ``optim_bits=8``
every parameter with at least ``min_8bit_size`` elements keeps m and v as uint8 codes of
bitsandbytes' dynamic maps with one fp32 absmax per 256 elements (2.03 bytes per parameter instead
of 8); smaller ones keep fp32 states. Each tensor's step is one fused op (``peftkern.ops.adamw``)
whose face follows ``peftkern.backend``. A gradient holding inf or NaN skips that tensor's update
with a warning; its state and step count stay as they were.

State per parameter (``state_dict()`` holds these tensors as they are):
  32-bit: ``step`` (fp32 scalar on the CPU), ``exp_avg``, ``exp_avg_sq`` (fp32, the parameter's shape),
          the names torch.optim.AdamW uses, so either optimizer loads the other's 32-bit state;
  8-bit:  ``step``, ``exp_avg_codes``, ``exp_avg_sq_codes`` (uint8, the parameter's shape),
          ``exp_avg_absmax``, ``exp_avg_sq_absmax`` (fp32 [ceil(numel / 256)]).
Loading converts between the two forms when a parameter's bits differ from the saved ones.

Anchored penalty (EWC, L2-SP): :meth:`PagedAdamW.set_anchor` gives a parameter an anchor (its
value now, by default) and optionally a diagonal Fisher F; with a group's ``anchor_lambda`` > 0
every step then minimises loss + anchor_lambda / 2 * sum F (p - anchor)^2, the penalty's gradient
folded into the fused step (one extra read of the anchor and of F, no autograd term). F = 1 when
none is given (L2-SP). The anchor (the parameter's dtype) and F (fp32, or 8-bit codes of the
unsigned dynamic map with an absmax per 256, ``fisher_bits=8``) are state entries too:
``anchor``, ``anchor_fisher`` or ``anchor_fisher_codes`` + ``anchor_fisher_absmax``, saved and
restored with the rest, paged like the moments.
"""
from __future__ import annotations

import math
import warnings

import torch

from peftkern.ops import adamw as adamw_ops
from peftkern.optim.pager import Pager
from peftkern.reference.adamw import BLOCKSIZE, dequantize_blockwise, dynamic_map, quantize_blockwise

STATE_32BIT = ("exp_avg", "exp_avg_sq")
STATE_8BIT = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")
ANCHOR_STATE = ("anchor", "anchor_fisher", "anchor_fisher_codes", "anchor_fisher_absmax")
PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_betas(name: str, betas) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{name}: betas must be a pair (beta1, beta2), got {betas!r}")


def _check_group(name: str, group: dict) -> None:
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if isinstance(lr, torch.Tensor):
        raise TypeError(f"{name}: lr must be a float, not a tensor")
    adamw_ops.check_hyperparameters(name, 1, lr, beta1, beta2, eps, wd)
    if group["optim_bits"] not in (8, 32):
        raise ValueError(f"{name}: optim_bits must be 32 or 8, got {group['optim_bits']!r}")
    size = group["min_8bit_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"{name}: min_8bit_size must be an int >= 0, got {size!r}")
    lam = group["anchor_lambda"]
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0.0:
        raise ValueError(f"{name}: anchor_lambda (the EWC / L2-SP strength) must be a finite number >= 0, "
                         f"got {lam!r}")


class PagedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with 32-bit or 8-bit states, paged to host memory on CUDA.

    Args:
        params: parameters or param groups; a group may set its own ``lr``, ``betas``, ``eps``,
            ``weight_decay``, ``optim_bits`` and ``min_8bit_size``. Parameters must be fp32, fp16
            or bf16 (states are fp32 or 8-bit whatever the parameter dtype).
        optim_bits: 32 (fp32 m, v) or 8 (blockwise 8-bit m, v).
        paged: on CUDA, states of 1 MiB and more live in managed memory (``optim.pager``),
            prefetched to the GPU before each step when it has room, else kept in host memory.
            Without CUDA the states stay in ordinary memory (said once).
        min_8bit_size: parameters with fewer elements keep 32-bit states under ``optim_bits=8``.
        anchor_lambda: strength of the anchored penalty (EWC / L2-SP) on parameters given an anchor
            with :meth:`set_anchor`; 0 turns it off. A group may set its own.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, optim_bits: int = 32, paged: bool = True, min_8bit_size: int = 4096,
                 anchor_lambda: float = 0.0):
        _check_betas(type(self).__name__, betas)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, optim_bits=optim_bits,
                        min_8bit_size=min_8bit_size, anchor_lambda=anchor_lambda)
        _check_group(type(self).__name__, defaults)
        self.paged = bool(paged)
        self._pager = Pager(self.paged, owner=type(self).__name__)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_betas(type(self).__name__, group["betas"])
        group["betas"] = tuple(group["betas"])
        _check_group(type(self).__name__, group)
        for p in group["params"]:
            if p.dtype not in PARAM_DTYPES:
                raise TypeError(f"{type(self).__name__}: parameter of shape {tuple(p.shape)} has dtype {p.dtype}; "
                                f"expected one of {', '.join(str(d) for d in PARAM_DTYPES)}")

    # -- state ----------------------------------------------------------------------------------

    @staticmethod
    def uses_8bit(p: torch.Tensor, group: dict) -> bool:
        """Whether ``p`` keeps 8-bit states in ``group``."""
        return group["optim_bits"] == 8 and p.numel() >= group["min_8bit_size"]

    def _zeros(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self._pager.zeros(numel, dtype, device)

    def _fresh_state(self, p: torch.Tensor, group: dict) -> dict:
        n = p.numel()
        state = {"step": torch.tensor(0.0, dtype=torch.float32)}
        if self.uses_8bit(p, group):
            blocks = -(-n // BLOCKSIZE)
            state["exp_avg_codes"] = self._zeros(n, torch.uint8, p.device).view(p.shape)
            state["exp_avg_absmax"] = self._zeros(blocks, torch.float32, p.device)
            state["exp_avg_sq_codes"] = self._zeros(n, torch.uint8, p.device).view(p.shape)
            state["exp_avg_sq_absmax"] = self._zeros(blocks, torch.float32, p.device)
        else:
            state["exp_avg"] = self._zeros(n, torch.float32, p.device).view(p.shape)
            state["exp_avg_sq"] = self._zeros(n, torch.float32, p.device).view(p.shape)
        return state

    # -- anchored penalty (EWC / L2-SP) ---------------------------------------------------------

    def _group_of(self, p: torch.Tensor) -> dict:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise ValueError(f"{type(self).__name__}.set_anchor: the tensor of shape {tuple(p.shape)} is not a "
                         "parameter of this optimizer")

    @torch.no_grad()
    def set_anchor(self, p: torch.Tensor, anchor: torch.Tensor | None = None, fisher: torch.Tensor | None = None,
                   fisher_bits: int = 32) -> None:
        """Anchor parameter ``p``: its steps minimise loss + anchor_lambda / 2 * sum F (p - anchor)^2.

        ``anchor`` defaults to ``p``'s value now (copied); ``fisher`` (p's shape, finite, >= 0) to
        None, meaning F = 1 (L2-SP). ``fisher_bits=8`` stores F as 8-bit blockwise codes (1.02 bytes
        per element instead of 4), dequantized inside the step as the 8-bit moments are.
        """
        name = f"{type(self).__name__}.set_anchor"
        group = self._group_of(p)
        anchor = p.detach() if anchor is None else anchor
        if not isinstance(anchor, torch.Tensor) or tuple(anchor.shape) != tuple(p.shape):
            raise ValueError(f"{name}: anchor must be a tensor of the parameter's shape {tuple(p.shape)}, got "
                             f"{tuple(anchor.shape) if isinstance(anchor, torch.Tensor) else type(anchor).__name__}")
        if fisher_bits not in (8, 32):
            raise ValueError(f"{name}: fisher_bits must be 32 or 8, got {fisher_bits!r}")
        if fisher is not None:
            if not isinstance(fisher, torch.Tensor) or tuple(fisher.shape) != tuple(p.shape):
                raise ValueError(f"{name}: fisher must be a tensor of the parameter's shape {tuple(p.shape)}, got "
                                 f"{tuple(fisher.shape) if isinstance(fisher, torch.Tensor) else type(fisher).__name__}")
            if not fisher.is_floating_point():
                raise TypeError(f"{name}: fisher has dtype {fisher.dtype}, expected a float dtype")
            lo, hi = torch.aminmax(fisher.float()) if fisher.numel() else (torch.zeros(()), torch.zeros(()))
            if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))) or lo.item() < 0.0:
                raise ValueError(f"{name}: fisher (shape {tuple(p.shape)}) must be finite and >= 0; its range is "
                                 f"[{lo.item()}, {hi.item()}]")
        state = self.state[p]
        if not state:
            state.update(self._fresh_state(p, group))
        self.clear_anchor(p)
        n = p.numel()
        state["anchor"] = self._zeros(n, p.dtype, p.device).view(p.shape)
        state["anchor"].copy_(anchor)
        if fisher is None:
            return
        fisher = fisher.to(p.device, torch.float32)
        if fisher_bits == 32:
            state["anchor_fisher"] = self._zeros(n, torch.float32, p.device).view(p.shape)
            state["anchor_fisher"].copy_(fisher)
        else:
            codes, absmax = quantize_blockwise(fisher, dynamic_map(False, p.device))
            state["anchor_fisher_codes"] = self._zeros(n, torch.uint8, p.device).view(p.shape)
            state["anchor_fisher_codes"].copy_(codes)
            state["anchor_fisher_absmax"] = self._zeros(absmax.numel(), torch.float32, p.device)
            state["anchor_fisher_absmax"].copy_(absmax)

    def clear_anchor(self, p: torch.Tensor) -> None:
        """Remove ``p``'s anchor and Fisher (its steps are plain AdamW again)."""
        for key in ANCHOR_STATE:
            self.state[p].pop(key, None)

    def state_bytes(self) -> int:
        """Bytes held by every state tensor (step counters included)."""
        return sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor))

    # -- step -----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step over every parameter with a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__}: sparse gradients are not supported "
                                       f"(parameter {pi} of group {gi})")
                work.append((gi, pi, group, p))
                if not self.state[p]:
                    self.state[p] = self._fresh_state(p, group)
        finite = _finite_flags([p.grad for _, _, _, p in work])
        self._pager.prefetch()
        for (gi, pi, group, p), ok in zip(work, finite):
            if not ok:
                warnings.warn(f"{type(self).__name__}: the gradient of parameter {pi} in group {gi} "
                              f"(shape {tuple(p.shape)}) holds inf or NaN; its update is skipped this step "
                              "and its state is unchanged", RuntimeWarning, stacklevel=3)
                continue
            self._step_one(p, group, self.state[p])
        return loss

    def _step_one(self, p: torch.Tensor, group: dict, state: dict) -> None:
        step = int(state["step"].item()) + 1
        beta1, beta2 = group["betas"]
        hyper = dict(step=step, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                     weight_decay=group["weight_decay"])
        target = p if p.is_contiguous() else p.contiguous()
        grad = p.grad.contiguous()
        if "anchor" in state and group["anchor_lambda"] > 0:
            fisher = state.get("anchor_fisher")
            if "anchor_fisher_codes" in state:
                fisher = (state["anchor_fisher_codes"].view(-1), state["anchor_fisher_absmax"])
            hyper.update(anchor=state["anchor"], fisher=fisher, penalty=group["anchor_lambda"])
        if "exp_avg_codes" in state:
            adamw_ops.adamw8bit_step(target, grad, state["exp_avg_codes"], state["exp_avg_absmax"],
                                     state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], **hyper)
        else:
            adamw_ops.adamw_step(target, grad, state["exp_avg"], state["exp_avg_sq"], **hyper)
        if target is not p:
            p.copy_(target)
        state["step"].fill_(step)

    # -- checkpoints ----------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a ``state_dict()`` of this optimizer (or torch.optim.AdamW's): hyperparameters per
        group, and each parameter's state copied into fresh (paged, where enabled) tensors,
        converted between 32-bit and 8-bit when the parameter's bits differ from the saved ones."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError(f"{type(self).__name__}.load_state_dict: expected a dict with 'state' and "
                             "'param_groups' (an optimizer state_dict)")
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        super().load_state_dict({"state": {}, "param_groups": saved_groups})
        for group in self.param_groups:
            group.setdefault("optim_bits", self.defaults["optim_bits"])
            group.setdefault("min_8bit_size", self.defaults["min_8bit_size"])
            group.setdefault("anchor_lambda", self.defaults["anchor_lambda"])
            group["betas"] = tuple(group["betas"])
            _check_group(type(self).__name__, group)
        owners = {}
        for saved, group in zip(saved_groups, self.param_groups):
            for key, p in zip(saved["params"], group["params"]):
                owners[key] = (p, group)
        for key, saved in saved_state.items():
            if key not in owners:
                raise ValueError(f"{type(self).__name__}.load_state_dict: state for parameter id {key!r} matches "
                                 "no parameter of the saved param_groups")
            p, group = owners[key]
            self.state[p] = self._restore_state(p, group, saved)

    def _restore_state(self, p: torch.Tensor, group: dict, saved: dict) -> dict:
        name = f"{type(self).__name__}.load_state_dict"
        if "step" not in saved:
            raise ValueError(f"{name}: a state (parameter of shape {tuple(p.shape)}) has no 'step'")
        step = float(saved["step"].item() if isinstance(saved["step"], torch.Tensor) else saved["step"])
        n, blocks = p.numel(), -(-p.numel() // BLOCKSIZE)
        if all(k in saved for k in STATE_8BIT):
            _check_saved(name, saved, p, {"exp_avg_codes": (torch.uint8, n), "exp_avg_sq_codes": (torch.uint8, n),
                                          "exp_avg_absmax": (torch.float32, blocks),
                                          "exp_avg_sq_absmax": (torch.float32, blocks)})
            codes = {k: saved[k].to(p.device) for k in STATE_8BIT}
            m = dequantize_blockwise(codes["exp_avg_codes"].reshape(-1), codes["exp_avg_absmax"], dynamic_map(True))
            v = dequantize_blockwise(codes["exp_avg_sq_codes"].reshape(-1), codes["exp_avg_sq_absmax"],
                                     dynamic_map(False))
        elif all(k in saved for k in STATE_32BIT):
            _check_saved(name, saved, p, {"exp_avg": (None, n), "exp_avg_sq": (None, n)})
            codes = None
            m = saved["exp_avg"].to(p.device, torch.float32).reshape(-1)
            v = saved["exp_avg_sq"].to(p.device, torch.float32).reshape(-1)
        else:
            raise ValueError(f"{name}: the state of a parameter of shape {tuple(p.shape)} has keys "
                             f"{sorted(saved)}; expected {list(STATE_32BIT)} or {list(STATE_8BIT)} with 'step'")
        state = self._fresh_state(p, group)
        state["step"].fill_(step)
        if "exp_avg_codes" in state:
            if codes is None:
                codes = {}
                codes["exp_avg_codes"], codes["exp_avg_absmax"] = quantize_blockwise(m, dynamic_map(True))
                codes["exp_avg_sq_codes"], codes["exp_avg_sq_absmax"] = quantize_blockwise(v, dynamic_map(False))
            for k in STATE_8BIT:
                state[k].view(-1).copy_(codes[k].reshape(-1))
        else:
            state["exp_avg"].view(-1).copy_(m)
            state["exp_avg_sq"].view(-1).copy_(v)
        self._restore_anchor(name, p, state, saved)
        return state

    def _restore_anchor(self, name: str, p: torch.Tensor, state: dict, saved: dict) -> None:
        if "anchor" not in saved:
            if any(k in saved for k in ANCHOR_STATE):
                raise ValueError(f"{name}: a state (parameter of shape {tuple(p.shape)}) has a Fisher but no anchor")
            return
        n, blocks = p.numel(), -(-p.numel() // BLOCKSIZE)
        expected = {"anchor": (p.dtype, n)}
        if "anchor_fisher" in saved:
            expected["anchor_fisher"] = (torch.float32, n)
        if "anchor_fisher_codes" in saved or "anchor_fisher_absmax" in saved:
            expected.update(anchor_fisher_codes=(torch.uint8, n), anchor_fisher_absmax=(torch.float32, blocks))
        missing = [k for k in expected if k not in saved]
        if missing:
            raise ValueError(f"{name}: a state (parameter of shape {tuple(p.shape)}) lacks {missing}")
        _check_saved(name, saved, p, expected)
        for key in expected:
            shape = (blocks,) if key == "anchor_fisher_absmax" else p.shape
            state[key] = self._zeros(expected[key][1], expected[key][0], p.device).view(shape)
            state[key].view(-1).copy_(saved[key].reshape(-1))


def _check_saved(name: str, saved: dict, p: torch.Tensor, expected: dict) -> None:
    for key, (dtype, numel) in expected.items():
        t = saved[key]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {key} must be a tensor, got {type(t).__name__}")
        if dtype is not None and t.dtype != dtype:
            raise TypeError(f"{name}: {key} has dtype {t.dtype}, expected {dtype}")
        if dtype is None and not t.is_floating_point():
            raise TypeError(f"{name}: {key} has dtype {t.dtype}, expected a float dtype")
        if t.numel() != numel:
            raise ValueError(f"{name}: {key} has {t.numel()} elements (shape {tuple(t.shape)}) but the parameter "
                             f"of shape {tuple(p.shape)} needs {numel}")


def _finite_flags(grads: list[torch.Tensor]) -> list[bool]:
    """Per gradient, whether every element is finite: one min/max reduction each (no temporaries)
    and one host transfer per device."""
    flags = [True] * len(grads)
    by_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    for i, g in enumerate(grads):
        if g.numel():
            lo, hi = torch.aminmax(g.reshape(-1))
            by_device.setdefault(g.device, []).append((i, torch.stack((lo, hi)).float()))
    for items in by_device.values():
        ok = torch.isfinite(torch.stack([t for _, t in items])).all(dim=1).tolist()
        for (i, _), good in zip(items, ok):
            flags[i] = good
    return flags


class AdamW8bit(PagedAdamW):
    """:class:`PagedAdamW` with 8-bit states and no paging (bitsandbytes' AdamW8bit)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, min_8bit_size: int = 4096, paged: bool = False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, optim_bits=8, paged=paged,
                         min_8bit_size=min_8bit_size)


class PagedAdamW8bit(PagedAdamW):
    """:class:`PagedAdamW` with 8-bit states, paged (bitsandbytes' PagedAdamW8bit)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, min_8bit_size: int = 4096):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, optim_bits=8, paged=True,
                         min_8bit_size=min_8bit_size)
