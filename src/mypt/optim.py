"""Optimizers: which parameters get which update rule, and Muon.

`make_optimizer(model, tc, device)` builds what `--optimizer` asks for:

* adamw: torch.optim.AdamW (the fused kernel on CUDA and CPU), weight decay on matrices only.
* muon: Muon on the hidden matrices (the 2-D weights inside the transformer blocks) and AdamW
  on the rest: the token and position embeddings, the output layer, norm gains and biases.
  Both live in one `MuonAdamW`, so the trainer, the gradient scaler and the checkpoint see
  one optimizer whose state is one optimizer.pt.

Each param group carries "lr_scale": the trainer sets a group's learning rate to the scheduled
rate times its scale, so Muon's rate (--muon_lr) follows the same warm-up and decay as AdamW's
(--learning_rate).

Muon is torch.optim.Muon (its hyperparameters, learning-rate adjustment, decoupled weight decay
and state) with its orthogonalisation done here: matrices of one shape are orthogonalised
together in one batched Newton-Schulz iteration, in bf16 where the machine multiplies bf16
fast and in fp32 elsewhere (torch's always casts to bf16, which a CPU without bf16 hardware
emulates at a fraction of fp32's speed). BENCHMARKS.md has the measurements behind both.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from mypt.config import TrainConfig
from mypt.errors import MyPTError


def make_optimizer(model: torch.nn.Module, tc: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer --optimizer names, over the model's trainable parameters."""
    fused = device.type in ("cuda", "cpu")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(_adamw_groups(named, tc), lr=tc.learning_rate, betas=(tc.beta1, tc.beta2),
                                 fused=fused)
    hidden = [(n, p) for n, p in named if is_hidden_matrix(n, p)]
    rest = [(n, p) for n, p in named if not is_hidden_matrix(n, p)]
    muon_group = {"params": [p for _, p in hidden], "lr": tc.muon_lr, "lr_scale": tc.muon_lr / tc.learning_rate}
    return MuonAdamW(
        Muon([muon_group], lr=tc.muon_lr, momentum=tc.muon_momentum, weight_decay=tc.weight_decay,
             ns_dtype=orthogonalisation_dtype(device)),
        torch.optim.AdamW(_adamw_groups(rest, tc), lr=tc.learning_rate, betas=(tc.beta1, tc.beta2), fused=fused),
    )


def _adamw_groups(named: list[tuple[str, torch.nn.Parameter]], tc: TrainConfig) -> list[dict[str, Any]]:
    return [
        {"params": [p for _, p in named if p.dim() >= 2], "weight_decay": tc.weight_decay, "lr_scale": 1.0},
        {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0},
    ]


def is_hidden_matrix(name: str, param: torch.Tensor) -> bool:
    """A 2-D weight inside a transformer block (not an embedding, not the output layer)."""
    return param.dim() == 2 and ".h." in f".{name}"


def orthogonalisation_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device multiplies bf16 matrices fast, else fp32."""
    from mypt.dist import cpu_has_fast_bf16

    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return torch.float32


def saved_optimizer(training_state: dict[str, Any]) -> str | None:
    """The optimizer whose state a checkpoint's optimizer.pt holds; None when it holds nothing to
    carry on (a model imported from another format, not trained by MyPT yet)."""
    saved = training_state.get("train_config")
    return None if saved is None else saved.get("optimizer", "adamw")


def optimizer_problem(tc: TrainConfig, fsdp: bool, saved: str | None, given: Iterable[str] = ()) -> str | None:
    """Why this run cannot use tc.optimizer (None if it can). saved: the resumed run's optimizer;
    given: the training flags on the command line (a Muon flag without Muon is a mistake)."""
    stray = [f"--{name}" for name in ("muon_lr", "muon_momentum") if name in given]
    if stray and tc.optimizer != "muon":
        verb = "applies" if len(stray) == 1 else "apply"
        return (f"{' and '.join(stray)} only {verb} to --optimizer muon, and this run uses --optimizer "
                f"{tc.optimizer}; add --optimizer muon (for a new model), or leave {' and '.join(stray)} out")
    if fsdp and tc.optimizer == "muon":
        return ("--optimizer muon cannot run with --fsdp: Muon orthogonalises whole matrices and FSDP "
                "gives each process a shard of them. Use data parallel (leave out --fsdp) or --optimizer adamw")
    if saved is not None and saved != tc.optimizer:
        return (f"--optimizer {tc.optimizer}: this model was trained with --optimizer {saved}, whose state is "
                f"in its optimizer.pt; resume with --optimizer {saved} (or leave the flag out)")
    return None


def check_optimizer(tc: TrainConfig, fsdp: bool, saved: str | None, given: Iterable[str] = ()) -> None:
    problem = optimizer_problem(tc, fsdp, saved, given)
    if problem:
        raise MyPTError(problem)


# ---------------------------------------------------------------------------------------------
# Muon


def zeropower(G: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
              dtype: torch.dtype) -> torch.Tensor:
    """Newton-Schulz orthogonalisation of a batch of matrices G (n, rows, cols), in `dtype`.

    The same quintic iteration as torch.optim.Muon: the result is close to U V^T of G's SVD.
    """
    a, b, c = coefficients
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT  # iterate on the smaller Gram matrix
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    return X.mT if tall else X


class Muon(torch.optim.Muon):
    """torch.optim.Muon with a batched orthogonalisation in a chosen dtype (see the module doc).

    Same hyperparameters, learning-rate adjustment, weight decay and state ("momentum_buffer")
    as torch's, so its state dict is torch.optim.Muon's.
    """

    def __init__(self, params: Iterable[Any], *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            bufs: list[torch.Tensor] = []
            self._init_group(group, params, grads, bufs)
            self._update(group, params, grads, bufs)
        return loss

    def _update(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor],
                bufs: list[torch.Tensor]) -> None:
        momentum, lr = group["momentum"], group["lr"]
        updates = []
        for grad, buf in zip(grads, bufs, strict=True):
            buf.lerp_(grad, 1 - momentum)
            updates.append(grad.lerp(buf, momentum) if group["nesterov"] else buf)
        for members, ortho in self._orthogonalise(group, updates):
            for i, update in zip(members, ortho, strict=True):
                param = params[i]
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update.to(param.dtype), alpha=-lr * _lr_ratio(group["adjust_lr_fn"], param.shape))

    def _orthogonalise(self, group: dict[str, Any],
                       updates: list[torch.Tensor]) -> Iterator[tuple[list[int], list[torch.Tensor]]]:
        """Orthogonalised updates, one batched iteration per shape (a tall matrix counted as its
        transpose, which the iteration works on anyway)."""
        by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, update in enumerate(updates):
            by_shape[tuple(sorted(update.shape))].append(i)
        for members in by_shape.values():
            wide = [updates[i] if updates[i].size(0) <= updates[i].size(1) else updates[i].T for i in members]
            ortho = zeropower(torch.stack(wide), group["ns_coefficients"], group["ns_steps"], group["eps"],
                              self.ns_dtype)
            yield members, [o if updates[i].size(0) <= updates[i].size(1) else o.T
                            for o, i in zip(ortho, members, strict=True)]


def _lr_ratio(rule: str | None, shape: tuple[int, ...]) -> float:
    """torch.optim.Muon's learning-rate adjustment for a (rows, cols) matrix."""
    rows, cols = shape[:2]
    if rule == "match_rms_adamw":
        return 0.2 * max(rows, cols) ** 0.5
    return max(1.0, rows / cols) ** 0.5


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer made of a Muon and an AdamW over disjoint parameters.

    Its param_groups are both optimizers' groups (the same dicts) and its state is theirs, so a
    state dict, a gradient scaler or a learning-rate schedule treat it as any one optimizer.
    """

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW) -> None:
        self.muon, self.adamw = muon, adamw
        for group in muon.param_groups:
            group["kind"] = "muon"
        for group in adamw.param_groups:
            group["kind"] = "adamw"
        super().__init__(muon.param_groups + adamw.param_groups, defaults={})
        self._share()

    def _share(self) -> None:
        """Point both optimizers at this one's groups and state (again after a load replaced them)."""
        self.muon.param_groups = [g for g in self.param_groups if g["kind"] == "muon"]
        self.adamw.param_groups = [g for g in self.param_groups if g["kind"] == "adamw"]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._share()

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = self.muon.step(closure)  # the closure, if any, runs once, here
        self.adamw.step()
        return loss
