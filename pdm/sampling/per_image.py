"""Every image its own steps: adaptive step-size control per image inside one batch.

DPM-Solver's adaptive method (2206.00927 Sec. 4.2; ``method="adaptive"``, as the official code)
takes one error norm for the whole batch, so the hardest image sets the step of all. Here each
image has its own time, step size, accepted and rejected tries and end; images at different
times share each network call (``model_fn`` takes one time per row). Two error estimators:

- ``singlestep``: the embedded pairs of DPM-Solver, 1 against 2 (order 2) or 2 against 3
  (order 3) evaluations inside the step, as the official adaptive method; a rejected try keeps
  the output at its start, so a retry costs one (or two) evaluations, not two (or three).
- ``multistep``: DPM-Solver(++) multistep of the order against the order below, over each
  image's own variable-step history (2M against DDIM, 3M against 2M): both predictions use only
  past outputs, so a try costs no evaluation and an accepted step exactly one.

A try is accepted when E = RMS((x_high - x_low) / max(atol, rtol max(|x_low|, |x_prev|))) <= 1;
the next step is min(theta h E^(-1/order), lambda_end - lambda) with theta = 0.9, in lambda.
``max_nfe`` caps an image's evaluations: the try that would leave too few for another goes to
the end and is accepted. :class:`PerImageSolver` holds a batch of *slots*; a slot whose image
finished can take the next image (``start``), which is how ``sample.py`` keeps the batch full.
An image's result depends only on its own noise, label and the settings: rows never mix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor

from pdm.sampling.evaluator import ModelEvaluator
from pdm.sampling.points import lanewise
from pdm.sampling.settings import Settings
from pdm.sampling.solvers import (
    TimePoint,
    first_order_update,
    ipndm_update,
    multistep_second_update,
    multistep_third_update,
    singlestep_second_update,
    singlestep_third_update,
)
from pdm.schedule import VPSchedule

ESTIMATORS = ("singlestep", "multistep")
THETA, T_ERR, MAX_TRIES = 0.9, 1e-5, 40
GROWTH = (
    2.0  # the multistep estimator's largest step ratio: it extrapolates, so it cannot see ahead
)


class PerImageSolver:
    """``slots`` images integrated from ``t_start`` to ``t_end``, each with its own steps.

    Args:
        evaluate: the run's evaluator (its ``model_kwargs`` are the slots' and are written by
            :meth:`start`; its ``nfe`` counts per slot).
        schedule, s: the noise schedule and resolved settings (``method="per_image"``).
        like: a tensor shaped like one slot batch (B, ...), for the state's dtype and device.
    """

    def __init__(
        self,
        evaluate: ModelEvaluator,
        schedule: VPSchedule,
        s: Settings,
        like: Tensor,
        t_start: float,
        t_end: float,
    ) -> None:
        self.evaluate, self.schedule, self.s = evaluate, schedule, s
        self.order, self.variant = s.order, s.variant or "dpmsolver"
        self.data, self.ndim = evaluate.data, like.ndim
        self.t_start, self.t_end = t_start, t_end
        lam = schedule.lambda_(torch.tensor([t_start, t_end], dtype=torch.float64)).tolist()
        self.lam_start, self.lam_end = lam
        b, dev = like.shape[0], like.device
        self.x, self.x_prev = torch.zeros_like(like), torch.zeros_like(like)
        self.lam = torch.full((b,), self.lam_start, dtype=torch.float64, device=dev)
        self.h = torch.full((b,), s.h_init, dtype=torch.float64, device=dev)
        self.active = torch.zeros(b, dtype=torch.bool, device=dev)
        self.tries = torch.zeros(b, dtype=torch.long, device=dev)  # rejected tries, per image
        history = self.order if s.estimator == "multistep" else 1
        self.outputs = like.new_zeros((history, *like.shape))  # newest last
        self.lams = torch.zeros(history, b, dtype=torch.float64, device=dev)
        self.known = torch.zeros(
            b, dtype=torch.long, device=dev
        )  # outputs held for the current point

    def start(self, rows: Tensor, x: Tensor, model_kwargs: dict[str, Tensor]) -> None:
        """Put new images ``x`` (at t_start) into the slots ``rows``, with their model arguments."""
        for k, v in model_kwargs.items():
            self.evaluate.model_kwargs[k][rows] = v
        self.x[rows], self.x_prev[rows] = x, x
        self.lam[rows], self.h[rows] = self.lam_start, self.s.h_init
        self.active[rows], self.known[rows], self.tries[rows] = True, 0, 0
        self.evaluate.nfe[rows] = 0

    def step(self) -> Tensor:
        """One round for every active slot; returns the slots whose image reached t_end."""
        rows = torch.nonzero(self.active).flatten()
        if rows.numel() == 0:
            return rows
        if self.s.estimator == "multistep":
            self._multistep_round(rows)
        else:
            self._singlestep_round(rows)
        t_now = lanewise(self.schedule.t_of_lambda, self.lam[rows])
        done = rows[(t_now - self.t_end).abs() <= T_ERR]
        self.active[done] = False
        return done

    # -- helpers ------------------------------------------------------------------------------
    def _point(self, lam: Tensor) -> TimePoint:
        t = lanewise(self.schedule.t_of_lambda, lam).to(self.x.dtype)
        return TimePoint.rows(self.schedule, t, self.ndim)

    def _model(self, rows: Tensor) -> Callable[[Tensor, TimePoint], Tensor]:
        """``model_at(x, point)`` for the slots ``rows``: one network call, counted per slot."""

        def model_at(x: Tensor, point: TimePoint) -> Tensor:
            kwargs = {k: v[rows] for k, v in self.evaluate.model_kwargs.items()}
            raw = self.evaluate.model_fn(x, point.t.flatten(), **kwargs).to(x.dtype)
            self.evaluate.nfe[rows] += 1
            return self.evaluate.convert(raw, x, point)

        return model_at

    def _error(self, x_high: Tensor, x_low: Tensor, x_prev: Tensor) -> Tensor:
        s = self.s
        delta = torch.clamp(s.rtol * torch.maximum(x_low.abs(), x_prev.abs()), min=s.atol)
        return ((x_high - x_low) / delta).flatten(1).pow(2).mean(dim=1).sqrt().double()

    def _forced(self, rows: Tensor, cost: Tensor, next_cost: int) -> Tensor:
        """Rows whose budget leaves no room for another try after this one: they go to the end."""
        if self.s.max_nfe is None:
            return torch.zeros_like(rows, dtype=torch.bool)
        return self.evaluate.nfe[rows] + cost + next_cost > self.s.max_nfe

    def _budgeted(self, rows: Tensor, forced: Tensor) -> Tensor:
        """The step of each row's try: its own, or the whole rest when ``forced``."""
        rest = self.lam_end - self.lam[rows]
        return torch.where(forced, rest, torch.minimum(self.h[rows], rest))

    def _advance(
        self,
        rows: Tensor,
        h: Tensor,
        err: Tensor,
        accept: Tensor,
        order: Tensor | int,
        estimated: Tensor | None = None,
    ) -> None:
        """New step sizes for ``rows`` after a try of step ``h`` (accepted rows have moved); a row
        whose try had no error estimate (``estimated`` False) keeps its step."""
        lam = self.lam[rows] + torch.where(accept, h, torch.zeros_like(h))
        to_end = accept & (h >= self.lam_end - self.lam[rows])
        self.lam[rows] = torch.where(to_end, torch.full_like(lam, self.lam_end), lam)
        exponent = (-1.0 / torch.as_tensor(order, dtype=torch.float64)).expand(err.shape)
        grow = THETA * h * lanewise(torch.pow, err.clamp(min=1e-12), exponent)
        if estimated is not None:  # the multistep estimator
            grow = torch.minimum(torch.where(estimated, grow, h), GROWTH * h)
        self.h[rows] = torch.minimum(grow, self.lam_end - self.lam[rows])
        self.tries[rows] += (~accept).long()

    # -- the singlestep estimator -------------------------------------------------------------
    def _singlestep_round(self, rows: Tensor) -> None:
        fresh = rows[self.known[rows] == 0]
        if fresh.numel():  # the output at the start of the step (kept through a rejected try)
            x = self.x[fresh]
            self.outputs[-1, fresh] = self._model(fresh)(x, self._point(self.lam[fresh]))
            self.known[fresh] = 1
        forced = self._forced(rows, torch.full_like(rows, self.order - 1), self.order)
        h = self._budgeted(rows, forced)
        lam, x, m_s = self.lam[rows], self.x[rows], self.outputs[-1, rows]
        s, t, model_at = self._point(lam), self._point(lam + h), self._model(rows)
        if self.order == 2:  # DPM-Solver-1 against DPM-Solver-2 at r1 = 1/2
            x_low = first_order_update(x, s, t, m_s, self.data)
            x_high, _ = singlestep_second_update(
                x, s, self._point(lam + 0.5 * h), t, m_s, model_at, self.data, self.variant
            )
        else:  # DPM-Solver-2 at r1 = 1/3 against DPM-Solver-3 at (1/3, 2/3), sharing m_s1
            s1, s2 = self._point(lam + h / 3.0), self._point(lam + 2.0 * h / 3.0)
            x_low, (_, m_s1) = singlestep_second_update(
                x, s, s1, t, m_s, model_at, self.data, self.variant
            )
            x_high, _ = singlestep_third_update(
                x, s, s1, s2, t, m_s, model_at, self.data, self.variant, m_s1=m_s1
            )
        err = self._error(x_high, x_low, self.x_prev[rows])
        accept = (err <= 1.0) | forced
        moved = rows[accept]
        self.x[moved], self.x_prev[moved] = x_high[accept], x_low[accept]
        self.known[moved] = 0
        self._advance(rows, h, err, accept, self.order)

    # -- the multistep estimator --------------------------------------------------------------
    def _multistep_round(self, rows: Tensor) -> None:
        fresh = rows[self.known[rows] == 0]
        if fresh.numel():  # a new image: its first output
            self._push(fresh, self._model(fresh)(self.x[fresh], self._point(self.lam[fresh])))
        pending, moved = rows, []
        for attempt in range(
            MAX_TRIES
        ):  # tries cost no evaluation: retry until every row has moved
            accept = self._multistep_try(pending, last=attempt == MAX_TRIES - 1)
            moved.append(pending[accept])
            pending = pending[~accept]
            if pending.numel() == 0:
                break
        moved = torch.cat(moved)
        going_on = moved[
            (lanewise(self.schedule.t_of_lambda, self.lam[moved]) - self.t_end).abs() > T_ERR
        ]
        if going_on.numel():  # the output at each new point: one network call
            self._push(
                going_on, self._model(going_on)(self.x[going_on], self._point(self.lam[going_on]))
            )

    def _multistep_try(self, rows: Tensor, last: bool = False) -> Tensor:
        """One try of every row in ``rows`` (``last``: the round's last, accepted whatever its
        error); returns which were accepted (they have moved)."""
        held = self.known[rows].clamp(max=self.order)
        forced = self._forced(rows, torch.zeros_like(rows), 1) | last
        h = self._budgeted(rows, forced)
        x_high, x_low = self.x[rows].clone(), self.x[rows].clone()
        for p in held.unique().tolist():
            sel = held == p
            x_high[sel], x_low[sel] = self._multistep_pair(rows[sel], h[sel], p)
        err = torch.where(held > 1, self._error(x_high, x_low, self.x[rows]), torch.zeros_like(h))
        accept = (err <= 1.0) | forced
        self.x[rows[accept]] = x_high[accept]
        self._advance(rows, h, err, accept, held.double(), estimated=held > 1)
        return accept

    def _multistep_pair(self, rows: Tensor, h: Tensor, p: int) -> tuple[Tensor, Tensor]:
        """(order p, order p - 1) multistep predictions for ``rows`` (p = 1: no lower order)."""
        x = self.x[rows]
        points = [self._point(self.lams[-j, rows]) for j in range(p, 0, -1)]  # oldest first
        outputs = [self.outputs[-j, rows] for j in range(p, 0, -1)]
        t = self._point(self.lam[rows] + h)
        if (
            self.s.solver == "ipndm"
        ):  # Adams-Bashforth in x/alpha against sigma/alpha, equal-step weights
            high = ipndm_update(x, points[-1], t, outputs, p)
            return high, ipndm_update(x, points[-1], t, outputs, p - 1) if p > 1 else high
        first = first_order_update(x, points[-1], t, outputs[-1], self.data)
        if p == 1:
            return first, first
        second = multistep_second_update(x, points, t, outputs, self.data, self.variant)
        if p == 2:
            return second, first
        return multistep_third_update(x, points, t, outputs, self.data), second

    def _push(self, rows: Tensor, out: Tensor) -> None:
        self.outputs[:, rows] = torch.cat([self.outputs[1:, rows], out[None]])
        self.lams[:, rows] = torch.cat([self.lams[1:, rows], self.lam[rows][None]])
        self.known[rows] += 1


def per_image(
    noise: Tensor,
    evaluate: ModelEvaluator,
    schedule: VPSchedule,
    s: Settings,
    grid: Tensor,
    on_round: Callable[[int], None] | None = None,
) -> Tensor:
    """Integrate the whole batch ``noise`` with per-image step control; x at ``grid[-1]``."""
    solver = PerImageSolver(evaluate, schedule, s, noise, float(grid[0]), float(grid[-1]))
    rows = torch.arange(noise.shape[0], device=noise.device)
    solver.start(rows, noise, {k: v.clone() for k, v in evaluate.model_kwargs.items()})
    rounds = 0
    while bool(solver.active.any()):
        solver.step()
        rounds += 1
        if on_round is not None:
            on_round(rounds)
    return solver.x


def stream(
    model_fn: Callable[..., Tensor],
    schedule: VPSchedule,
    settings: Settings,
    batch: int,
    images: Iterable[tuple[int, Tensor, dict[str, Tensor]]],
    prediction: str = "eps",
    t_start: float | None = None,
    t_end: float | None = None,
) -> Iterator[tuple[int, Tensor, int]]:
    """Continuous batching: keep ``batch`` slots busy with ``images`` ((index, noise, model_kwargs)
    each, one image without its batch dimension) and yield (index, x at t_end, its NFE) as each
    image finishes, in the order they finish. A slot freed by a finished image takes the next
    one at once, so the network's calls stay full until the images run out."""
    from pdm.sampling.catalog import solver_spec
    from pdm.sampling.evaluator import Thresholding

    s = settings.resolved(prediction)
    if s.method != "per_image":
        raise ValueError(
            f"continuous batching needs per-image steps (method per_image, --method per_image), "
            f"not {s.method}"
        )
    queue = iter(images)
    first = next(queue, None)
    if first is None:
        return
    _, x0, kw0 = first
    like = x0.new_zeros((batch, *x0.shape))
    slot_kwargs = {k: v.new_zeros((batch, *v.shape)) for k, v in kw0.items()}
    clamp = Thresholding(s.threshold_ratio, s.threshold_max) if s.thresholding else None
    evaluate = ModelEvaluator(
        model_fn, prediction, solver_spec(s.solver).data, slot_kwargs, clamp, batch, like.device
    )
    t0 = schedule.t_max if t_start is None else t_start
    t1 = schedule.t_min if t_end is None else t_end
    solver = PerImageSolver(evaluate, schedule, s, like, t0, t1)
    queue, owner, free = _chain(first, queue), {}, list(range(batch))
    while True:
        while free:
            item = next(queue, None)
            if item is None:
                break
            slot = free.pop(0)
            index, x, kwargs = item
            rows = torch.tensor([slot], device=like.device)
            solver.start(rows, x[None].to(like), {k: v[None] for k, v in kwargs.items()})
            owner[slot] = index
        if not owner:
            return
        for slot in solver.step().tolist():
            yield owner.pop(slot), solver.x[slot].clone(), int(evaluate.nfe[slot])
            free.append(slot)
        free.sort()


def _chain(first, rest: Iterator) -> Iterator:
    yield first
    yield from rest
