"""Thresholds calibrated to an error budget (docs/DESIGN.md section 4.2).

A fixed threshold means different errors in different layers and steps. Calibration picks, for every call of a
layer and guidance branch during one run of the user's own pipeline, the largest threshold whose attention output
stays within ``target_error`` of dense attention, and saves the choices as a small JSON :class:`Profile` that later
runs load (``liteattn.enable(pipe, profile="wan.json")``).

**The error** is the relative L2 error of the layer call's whole attention output against dense attention over
the same q/k/v: ``||o - o_dense|| / ||o_dense||``, computed in float32 (the skipping error alone, without the
kernel's bf16 rounding, which is the same for dense and sparse).

**One pass for every candidate threshold.** A tile's fate under any threshold is known from one number, its
*score* (the keep rule's largest gain over the q-tile's rows: kept iff ``score > threshold``;
``torch_ref.attention_forward(score_out=...)``). The pass also keeps each tile's partial softmax sums ``l_j`` and
partial outputs ``o_j`` (per row, against the row's dense maximum), so the output under the tile set ``K`` is
``sum_{j in K} o_j / sum_{j in K} l_j``. The candidates' tile sets are nested, so after sorting the tiles by score
each candidate's output is a prefix sum read at its count of tiles: every candidate for the price of one cumulative
sum, no attention call per probe (the reference bisects with two kernel calls per probe).

**What a choice means.** The threshold chosen at step ``t`` decides which of the tiles read at ``t`` are read
again at ``t + 1`` and later. Its error is predicted on step ``t``'s own q/k/v (the paper's premise: the pattern
changes little from step to step), with the tiles that step ``t`` reads as the starting set.

**Re-admission.** Lists only shrink, so an error that has grown past the budget cannot fall again. With
``refresh=True``, a call whose current list already exceeds ``refresh_factor * target`` reads every tile again
(its list is rebuilt from scratch by this call's decision); the profile records the refresh so that later runs
repeat it.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from .backends import torch_ref
from .criteria import check_criterion, check_threshold, needs_lse
from .skip import check_tile, normalize_ranges, num_tiles, tiles_overlapping

__all__ = ["CANDIDATES", "threshold_errors", "choose_threshold", "check_target_error", "Profile",
           "CalibratingAttention", "CallRecord"]

# Candidate thresholds (log2 units): -inf (keep every read tile), then -30 ... 0 in quarter steps (a factor of
# 1.19 in a tile's share of a row's mass).
CANDIDATES: tuple = (-math.inf,) + tuple(-30.0 + 0.25 * i for i in range(121))

PROFILE_VERSION = 1
# Per chunk of the partial-output pass: float32 elements of o_j (a few such temporaries live at once).
_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 27}


def check_target_error(target) -> float:
    """``target`` as a float in (0, 1), else ValueError/TypeError naming what is accepted."""
    if isinstance(target, bool) or not isinstance(target, numbers.Real):
        raise TypeError(f"target_error must be a number in (0, 1) (relative L2 error of the attention output "
                        f"against dense), got {target!r}")
    target = float(target)
    if not 0.0 < target < 1.0:
        raise ValueError(f"target_error must be in (0, 1) (relative L2 error of the attention output against dense, "
                         f"e.g. 0.02), got {target}")
    return target


@torch.no_grad()
def threshold_errors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, criterion: str, tile_q: int = 128,
                     tile_k: int = 128, read: Optional[torch.Tensor] = None, lse_prev: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None, must_do=None, must_do_q=None,
                     candidates: Sequence[float] = CANDIDATES):
    """The attention-output error of every candidate threshold, from one pass over q/k/v.

    Args:
        q, k, v: ``(B, S, H, D)`` tensors as :func:`liteattn.lite_attention` takes them.
        criterion: the keep rule (:mod:`liteattn.criteria`).
        read: bool ``(B, H, Mq, Nk)``, the tiles this call reads (None: every tile).
        lse_prev: float32 ``(B, H, Sq)``, the previous call's LSE for the mass rule (NaN rows: none); not modified.
        must_do, must_do_q: key / query token ranges, as for :func:`liteattn.lite_attention`.
        candidates: thresholds (log2 units), ascending.

    Returns:
        ``(errors, scores)``: ``errors`` float64 ``(C,)`` on the CPU, the rel-L2 error of the output when the tiles
        read are those with ``score > candidate`` (at ``-inf``: exactly ``read``, this call's own error);
        ``scores`` float32 ``(B, H, Mq, Nk)``, each tile's decision statistic (+inf: always kept, -inf: not read).
    """
    criterion = check_criterion(criterion)
    B, Sq, H, D = q.shape
    Sk, Dv = k.shape[1], v.shape[-1]
    Mq, Nk = num_tiles(Sq, tile_q), num_tiles(Sk, tile_k)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    device = q.device
    must_do_k = normalize_ranges(must_do, Sk, "must_do")
    must_do_qr = normalize_ranges(must_do_q, Sq, "must_do_q")
    scores = torch.empty(B, H, Mq, Nk, dtype=torch.float32, device=device)
    lse_copy = None
    if needs_lse(criterion):
        lse_copy = (lse_prev.clone() if lse_prev is not None
                    else torch.full((B, H, Sq), math.nan, dtype=torch.float32, device=device))
    torch_ref.attention_forward(
        q, k, v, read, None, None, criterion, scale, tile_q, tile_k,
        tiles_overlapping(must_do_k, Sk, tile_k, device) if must_do_k else None,
        tiles_overlapping(must_do_qr, Sq, tile_q, device) if must_do_qr else None,
        False, lse_copy, scores)

    cand = torch.tensor(list(candidates), dtype=torch.float32, device=device)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    sq_err = torch.zeros(len(cand), dtype=torch.float64, device=device)
    sq_ref = torch.zeros((), dtype=torch.float64, device=device)
    pad_k, pad_q = Nk * tile_k - Sk, Mq * tile_q - Sq
    # Chunks of q-tiles x heads small enough that o_j (h, mq, tile_q, Nk, Dv) stays within _ELEMENTS.
    elements = _ELEMENTS.get(device.type, _ELEMENTS["cpu"])
    per_tile = tile_q * Nk * Dv
    heads_per = max(1, min(H, elements // per_tile))
    tiles_per = max(1, min(Mq, elements // (per_tile * heads_per)))
    cand_per = max(1, min(len(cand), elements // max(1, heads_per * tiles_per * tile_q * Dv)))
    for b in range(B):
        for h0 in range(0, H, heads_per):
            hs = slice(h0, min(H, h0 + heads_per))
            kb = torch.nn.functional.pad(k[b, :, hs].transpose(0, 1).to(compute), (0, 0, 0, pad_k))
            vb = torch.nn.functional.pad(v[b, :, hs].transpose(0, 1).to(compute), (0, 0, 0, pad_k))
            v_tiles = vb.unflatten(1, (Nk, tile_k))  # (h, Nk, tile_k, Dv)
            qb_all = torch.nn.functional.pad(q[b, :, hs].transpose(0, 1).to(compute), (0, 0, 0, pad_q))
            for t0 in range(0, Mq, tiles_per):
                t1 = min(Mq, t0 + tiles_per)
                qb = qb_all[:, t0 * tile_q:t1 * tile_q]  # (h, rows, D)
                s = torch.matmul(qb, kb.transpose(1, 2)).mul_(scale)  # (h, rows, Nk*tile_k)
                s[..., Sk:] = -math.inf
                s = s.sub_(s.amax(-1, keepdim=True)).exp_()  # p against the row's dense maximum
                p = s.unflatten(-1, (Nk, tile_k))  # (h, rows, Nk, tile_k)
                l_j = p.sum(-1)  # (h, rows, Nk)
                o_j = torch.einsum("hrnt,hntd->hrnd", p, v_tiles)  # (h, rows, Nk, Dv)
                dense = o_j.sum(2) / l_j.sum(2, keepdim=True)  # (h, rows, Dv)
                rows_valid = torch.arange(t0 * tile_q, t1 * tile_q, device=device) < Sq  # padding rows: no error
                dense = dense * rows_valid[:, None]
                sq_ref += dense.double().square().sum()
                mq = t1 - t0
                o_j = o_j.unflatten(1, (mq, tile_q))  # (h, mq, tile_q, Nk, Dv)
                l_j = l_j.unflatten(1, (mq, tile_q))
                dense = dense.unflatten(1, (mq, tile_q))
                valid = rows_valid.view(mq, tile_q)[None, :, :, None]
                tile_scores = scores[b, hs, t0:t1]  # (h, mq, Nk)
                # The tile sets of the candidates are nested: sort the tiles by score, and the output under any
                # threshold is a prefix sum over the sorted tiles, gathered at the count of tiles above it.
                order = tile_scores.argsort(dim=-1, descending=True)  # (h, mq, Nk)
                o_cum = o_j.gather(3, order[:, :, None, :, None].expand_as(o_j)).cumsum(3)
                l_cum = l_j.gather(3, order[:, :, None, :].expand_as(l_j)).cumsum(3)
                o_cum = torch.nn.functional.pad(o_cum, (0, 0, 1, 0))  # (h, mq, tile_q, Nk + 1, Dv): 0 tiles first
                l_cum = torch.nn.functional.pad(l_cum, (1, 0))
                for c0 in range(0, len(cand), cand_per):
                    c = cand[c0:c0 + cand_per]
                    counts = (tile_scores.unsqueeze(-1) > c).sum(-2)  # (h, mq, C): tiles kept by each candidate
                    idx = counts[:, :, None, :].expand(-1, -1, tile_q, -1)  # (h, mq, tile_q, C)
                    den = l_cum.gather(3, idx).unsqueeze(-1)  # (h, mq, tile_q, C, 1)
                    num = o_cum.gather(3, idx.unsqueeze(-1).expand(-1, -1, -1, -1, Dv))
                    out = torch.where(den > 0, num / den.clamp_min(torch.finfo(compute).tiny), 0.0)
                    diff = (out - dense.unsqueeze(3)) * valid.unsqueeze(3)
                    sq_err[c0:c0 + cand_per] += diff.double().square().sum(dim=(0, 1, 2, 4))
    errors = (sq_err / sq_ref.clamp_min(torch.finfo(torch.float64).tiny)).sqrt().cpu()
    return errors, scores


def choose_threshold(errors: torch.Tensor, target: float, candidates: Sequence[float] = CANDIDATES) -> float:
    """The largest candidate whose error is at most ``target`` (``-inf`` when none is: keep every read tile)."""
    ok = [c for c, e in zip(candidates, errors.tolist()) if e <= target]
    return max(ok) if ok else -math.inf


# -- the profile ---------------------------------------------------------------------------------------------------
def _encode(value: float):
    return None if value == -math.inf else value  # JSON has no -inf: null means "keep every read tile"


def _decode(value, where: str) -> float:
    if value is None:
        return -math.inf
    try:
        return check_threshold(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"profile: {where}: {exc}") from None


@dataclass
class Profile:
    """Per-layer, per-branch, per-step thresholds (and refresh steps) chosen by a calibration run.

    ``thresholds[layer][branch][step]``: log2 units (-inf: keep every read tile); the last step's value applies to
    later steps, branch 0's to branches the calibration run did not have. ``refresh[layer][branch]``: the steps at
    which that layer re-reads every tile before its call.
    """

    criterion: str
    tile_q: int
    tile_k: int
    target_error: Optional[float] = None
    warmup_steps: int = 0
    thresholds: Dict[str, List[List[float]]] = field(default_factory=dict)
    refresh: Dict[str, List[List[int]]] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)

    def at(self, layer: str, branch: int, step: int) -> float:
        per_branch = self.thresholds[layer]
        steps = per_branch[branch] if branch < len(per_branch) else per_branch[0]
        return steps[min(step, len(steps) - 1)] if steps else -math.inf

    def refreshes(self, layer: str, branch: int, step: int) -> bool:
        per_branch = self.refresh.get(layer, [])
        return branch < len(per_branch) and step in per_branch[branch]

    def check_matches(self, layers: Sequence[str], *, criterion: str, tile_q: int, tile_k: int) -> None:
        """ValueError unless this profile was calibrated for these layers, rule and tiles."""
        if (self.criterion, self.tile_q, self.tile_k) != (criterion, tile_q, tile_k):
            raise ValueError(f"the profile was calibrated with criterion={self.criterion!r}, tiles "
                             f"({self.tile_q}, {self.tile_k}); enable() was given criterion={criterion!r}, tiles "
                             f"({tile_q}, {tile_k}): pass the profile's values or calibrate again")
        missing = [name for name in layers if name not in self.thresholds]
        if missing:
            raise ValueError(f"the profile has no thresholds for {len(missing)} patched layer(s), e.g. {missing[0]!r}; "
                             f"it covers {sorted(self.thresholds)[:3]}...: calibrate this pipeline "
                             f"(enable(..., target_error=...)) or patch only the profiled layers")

    def to_json(self) -> dict:
        return {"liteattn_profile": PROFILE_VERSION, "criterion": self.criterion, "tile_q": self.tile_q,
                "tile_k": self.tile_k, "target_error": self.target_error, "warmup_steps": self.warmup_steps,
                "metric": "relative L2 error of each layer call's attention output against dense attention",
                "thresholds": {name: [[_encode(t) for t in steps] for steps in branches]
                               for name, branches in self.thresholds.items()},
                "refresh": self.refresh, "summary": self.summary}

    def save(self, path) -> str:
        path = os.fspath(path)
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)
        return path

    @classmethod
    def load(cls, path_or_dict) -> "Profile":
        """From a path to a saved profile or its dict; ValueError naming what is wrong with it."""
        if isinstance(path_or_dict, Profile):
            return path_or_dict
        if isinstance(path_or_dict, dict):
            data, where = path_or_dict, "profile"
        else:
            where = os.fspath(path_or_dict)
            if not os.path.isfile(where):
                raise ValueError(f"profile {where!r} does not exist; write one with handle.save_profile(path) after a "
                                 f"calibration run (enable(..., target_error=...))")
            with open(where) as f:
                try:
                    data = json.load(f)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"profile {where!r} is not JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("liteattn_profile") != PROFILE_VERSION:
            raise ValueError(f"{where} is not a liteattn profile (version {PROFILE_VERSION}): no "
                             f"'liteattn_profile': {PROFILE_VERSION} key")
        try:
            thresholds = {name: [[_decode(t, f"{name} branch {b} step {s}") for s, t in enumerate(steps)]
                                 for b, steps in enumerate(branches)]
                          for name, branches in data["thresholds"].items()}
            profile = cls(criterion=check_criterion(data["criterion"]), tile_q=check_tile("tile_q", data["tile_q"]),
                          tile_k=check_tile("tile_k", data["tile_k"]), target_error=data.get("target_error"),
                          warmup_steps=int(data.get("warmup_steps", 0)), thresholds=thresholds,
                          refresh={name: [[int(s) for s in steps] for steps in branches]
                                   for name, branches in data.get("refresh", {}).items()},
                          summary=data.get("summary", {}))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{where}: malformed liteattn profile ({type(exc).__name__}: {exc})") from None
        if not profile.thresholds or any(not branches for branches in profile.thresholds.values()):
            raise ValueError(f"{where}: the profile holds no thresholds")
        return profile


# -- calibrating one layer's calls ---------------------------------------------------------------------------------
@dataclass
class CallRecord:
    """What calibration saw and chose at one call of one layer and branch."""

    step: int
    threshold: float  # chosen (log2 units; -inf: keep every read tile)
    error: float  # this call's own error: the tiles it read against dense
    predicted: float  # the error of the chosen threshold's tiles, on this call's inputs
    read_sparsity: float  # fraction of tiles this call skipped
    next_sparsity: float  # fraction of tiles the next call will skip
    refreshed: bool


class CalibratingAttention:
    """Wraps a :class:`liteattn.LiteAttention`: before each call, picks the largest threshold whose error stays
    within ``target`` (module docstring), then makes the call with it. Called like the LiteAttention; runs eagerly.

    ``step`` is set by the caller before each call (the denoising step); ``records`` keeps one :class:`CallRecord`
    per call. ``refresh``: re-read every tile when the current list's error exceeds ``refresh_factor * target``.
    ``choose=False`` only measures: each call keeps the wrapped layer's own threshold, and the records show its
    errors (``target`` may then be None).

    **Budgeting for drift.** The tiles a step drops stay dropped, and their share of attention drifts as the later
    steps' inputs change: the same tile set's error grows from step to step (by 5-30 % a step on the demo models).
    So a choice at step ``t`` spends ``target / g**(T - 1 - t)``, where ``T`` is ``total_steps`` (set by the
    caller; None: no look-ahead) and ``g`` this layer's growth per step, estimated from its own calls (the error of
    a call over the error predicted for its tiles one step earlier, geometric mean of the last few, clipped to
    [1, 1.5]; ``prior_growth`` before the first estimate). The last steps thus spend the whole budget.
    """

    def __init__(self, attention, target: Optional[float], *, refresh: bool = False, refresh_factor: float = 1.0,
                 choose: bool = True, prior_growth: float = 1.1, total_steps: Optional[int] = None,
                 candidates: Sequence[float] = CANDIDATES):
        self.attention = attention
        self.prior_growth = float(prior_growth)
        self.total_steps = total_steps
        self._ratios: List[float] = []  # observed growth per step of this layer's error
        self.choose = bool(choose)
        self.target = check_target_error(target) if (choose or target is not None) else None
        if refresh and not choose:
            raise ValueError("refresh needs choose=True (a measuring run keeps the lists it is given)")
        self.refresh, self.refresh_factor = bool(refresh), float(refresh_factor)
        self.candidates = tuple(candidates)
        self.step = 0
        self.records: List[CallRecord] = []

    def __getattr__(self, name):  # computed_tiles, num_tile_pairs, skip_state, ...: the wrapped layer's
        return getattr(self.__dict__["attention"], name)

    def growth(self) -> float:
        """This layer's estimated error growth per step (class docstring)."""
        if not self._ratios:
            return self.prior_growth
        recent = self._ratios[-4:]
        return min(1.5, max(1.0, math.exp(sum(math.log(max(r, 1e-6)) for r in recent) / len(recent))))

    def budget(self) -> float:
        """The error this step's choice may reach on this step's inputs."""
        remaining = max(0, self.total_steps - 1 - self.step) if self.total_steps else 0
        return self.target / self.growth() ** remaining

    def __call__(self, *args, **kwargs):
        # Calibration is Python with host reads: it runs outside any torch.compile graph. (Wrapped here, not with a
        # decorator, so that importing liteattn does not import torch._dynamo.)
        call = self.__dict__.get("_eager_call")
        if call is None:
            call = self.__dict__["_eager_call"] = torch.compiler.disable(self._call)
        return call(*args, **kwargs)

    def _call(self, query, key, value, scale=None, return_softmax_lse=False, must_do_list=None,
              must_skip_list=None, must_do_q_list=None):
        attention = self.attention
        if not attention.enable_skipping:
            return attention(query, key, value, scale=scale, return_softmax_lse=return_softmax_lse,
                             must_do_list=must_do_list, must_skip_list=must_skip_list, must_do_q_list=must_do_q_list)
        if must_skip_list:
            raise ValueError("calibration does not support must_skip_list (its dense reference would differ)")
        B, Sq, H, _ = query.shape
        state = attention.skip_state
        fresh = state is None or not state.matches(B, H, Sq, key.shape[1], query.device, ()) or state.untouched

        candidates = self.candidates if self.choose else self.candidates + (attention.threshold,)

        def errors_for(read, lse):
            return threshold_errors(query, key, value, criterion=attention.criterion, tile_q=attention.tile_q,
                                    tile_k=attention.tile_k, read=read, lse_prev=lse, scale=scale,
                                    must_do=must_do_list, must_do_q=must_do_q_list, candidates=candidates)

        matches = state is not None and state.matches(B, H, Sq, key.shape[1], query.device, ())
        read = None if fresh else state.to_dense()
        lse = state.lse if matches else None
        errors, scores = errors_for(read, lse)
        refreshed = False
        if self.refresh and not fresh and errors[0].item() > self.refresh_factor * self.target:
            state.read_everything()  # keeps the LSE
            read, refreshed = None, True
            errors, scores = errors_for(read, lse)
        previous = self.records[-1] if self.records else None
        if (previous is not None and previous.step == self.step - 1 and not refreshed and not fresh
                and previous.predicted > 0.05 * (self.target or 1.0)):
            self._ratios.append(errors[0].item() / previous.predicted)
        if self.choose:
            threshold = choose_threshold(errors, self.budget(), candidates)
            chosen = candidates.index(threshold)
        else:
            threshold, chosen = attention.threshold, len(candidates) - 1
        total = scores.numel()
        read_sparsity = 1.0 - (scores > -math.inf).sum().item() / total
        next_sparsity = 1.0 - (scores > threshold).sum().item() / total
        if self.choose:
            attention.threshold = threshold
        result = attention(query, key, value, scale=scale, return_softmax_lse=return_softmax_lse,
                           must_do_list=must_do_list, must_skip_list=must_skip_list, must_do_q_list=must_do_q_list)
        if refreshed:
            self._ratios.clear()
        self.records.append(CallRecord(step=self.step, threshold=threshold, error=errors[0].item(),
                                       predicted=errors[chosen].item(), read_sparsity=read_sparsity,
                                       next_sparsity=next_sparsity, refreshed=refreshed))
        return result
