"""AutoProg's automated growth for MAE pretraining: the run picks each stage's encoder depth.

At a search stage with several candidate depths the encoder grows (with the recipe's growth op, MoGrow
from the EMA of the blocks in AutoProg's recipe) to the largest candidate: the supernet. A candidate
is a layer plan over its blocks that skips some duplicated blocks (the grown blocks that continue an
old one come first, then the copies in position order), so a candidate at the current depth is the
pre-growth network. For `search_epochs` epochs, counted in the budget, each optimizer step trains one
candidate drawn uniformly from (seed, step). Over the last of them `snapshots` times an EMA of the
whole MAE scores every candidate: L is the masked-patch loss (norm_pix_loss as trained) at the
recipe's mask ratio on a fixed evaluation set (fixed train images, centre crops, a per-image mask
from a fixed seed: mask noise would otherwise dominate the differences), T the cost of a training
step (FLOPs from `fastssl.flops`, or measured forward + backward including the decoder, max over
ranks). AutoProg's rule: fit L ~ a T^b over the candidates and take argmin L T^max(-b, 0); with two
candidates L T (a two-point fit passes through both and ties them); a failed fit falls back to L T
with a warning. Rank 0 decides and broadcasts; the winner is cut out of the supernet (its blocks
moved to positions 0..d-1 with their optimizer state and EMA rows) at the next epoch start.

Depth only: a resolution changes the patch targets (another grid, other pixels per patch), so losses
at different resolutions do not compare; resolution and mask ratio come from the manual schedule.
"""
from __future__ import annotations

import bisect
import json
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn

from fastssl.errors import ConfigError
from fastssl.models import growth
from fastssl.run import dist
from fastssl.train import optim
from fastssl.train.depth_growth import DepthGrowth
from fastssl.train.progressive import Stage, batch_split

if TYPE_CHECKING:
    from fastssl.config import PretrainConfig
    from fastssl.train.logger import RunLogger


# ---- the recipe ----------------------------------------------------------------------------------

def stage_at(cfg: PretrainConfig, epoch: int) -> int:
    return bisect.bisect_right([st.epoch for st in cfg.progressive.search.stages], epoch) - 1


def candidates(depths: list[int], have: int) -> list[int]:
    """The stage's candidate depths at the run's current depth: depth may not shrink."""
    return sorted({d for d in depths if d >= have}) or [have]


# ---- the decision --------------------------------------------------------------------------------

class FitError(ValueError):
    pass


def fit_power_law(times: list[float], losses: list[float]) -> tuple[float, float]:
    """(a, b) of L = a T^b by scipy's curve_fit (AutoProg's fit), started from the log-log least
    squares line; T is divided by its minimum so that FLOPs (~1e9) and seconds fit alike."""
    from scipy.optimize import OptimizeWarning, curve_fit

    t, loss = np.asarray(times, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(loss)) and np.all(t > 0) and np.all(loss > 0)):
        raise FitError(f"needs finite positive L and T (L={losses}, T={times})")
    tn = t / t.min()
    if np.ptp(np.log(tn)) == 0:
        raise FitError("every candidate has the same T")
    b0, log_a0 = np.polyfit(np.log(tn), np.log(loss), 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            (a, b), _ = curve_fit(lambda x, a, b: a * x ** b, tn, loss, p0=(np.exp(log_a0), b0), maxfev=10_000)
    except (RuntimeError, ValueError) as e:
        raise FitError(str(e)) from None
    if not (np.isfinite(a) and np.isfinite(b)):
        raise FitError(f"non-finite fit a={a}, b={b}")
    return float(a * t.min() ** -b), float(b)


def decide(depths: list[int], losses: list[float], times: list[float]) -> dict:
    """AutoProg's rule on two or more candidates' (L, T); ties go to the shallower candidate."""
    fit = None
    if len(depths) == 2:
        rule, w = "L*T (two candidates: a fit through both ties them)", 1.0
    else:
        try:
            a, b = fit_power_law(times, losses)
            fit, rule, w = {"a": a, "b": b}, "L*T^max(-b,0) of the fit L=a*T^b", max(-b, 0.0)
        except FitError as e:
            warnings.warn(f"progressive.search: the fit L=a*T^b failed ({e}); picking the lowest L*T",
                          RuntimeWarning, stacklevel=2)
            rule, w = f"L*T (fit failed: {e})", 1.0
    scores = [float(loss * t ** w) for loss, t in zip(losses, times)]
    winner = min(range(len(depths)), key=lambda i: (scores[i], depths[i]))
    return {"depths": list(depths), "loss": [float(x) for x in losses], "time": [float(x) for x in times],
            "score": scores, "fit": fit, "rule": rule, "winner": int(winner)}


def broadcast_winner(winner: int, device: torch.device) -> int:
    """Rank 0's pick on every rank (their L and T agree already; this makes it certain)."""
    if not torch_dist.is_initialized():
        return winner
    t = torch.tensor([winner], device=device)
    torch_dist.broadcast(t, 0)
    return int(t.item())


def uniform_candidate(seed: int, step: int, n: int) -> int:
    """The candidate a supernet step trains: a function of (seed, step) only, so every rank and a
    resumed run draw the same."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return int(torch.randint(n, (1,), generator=g))


# ---- the stage hook ------------------------------------------------------------------------------

class SearchGrowth(DepthGrowth):
    """DepthGrowth whose depths the run decides (`engine.StageHook`). `build` makes a fresh MAE of
    the run's architecture (the scored EMA runs in it); the decisions, the supernet's partial
    scores and the scored EMA are in the state dict, so a run resumes mid-search exactly."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: PretrainConfig,
                 info: dist.DistInfo, steps_per_epoch: int, build: Callable[[], nn.Module]):
        first = cfg.progressive.search.stages[0].depths
        super().__init__(model, optimizer, cfg.progressive.growth, max(first))
        self.run_cfg, self.scfg, self.info = cfg, cfg.progressive.search, info
        self.spe, self.build = steps_per_epoch, build
        if self.scfg.snapshots > steps_per_epoch:
            raise ConfigError(f"progressive.search.snapshots={self.scfg.snapshots}: must be <= the "
                              f"{steps_per_epoch} steps of an epoch")
        self.depth_target = max(first)
        self.decisions: list[dict] = []
        self.supernet: dict | None = None  # the search in progress
        self.score_ema: dict[str, torch.Tensor] | None = None
        self.logger: RunLogger | None = None
        # (res, images over all ranks, this rank's images, their mask noise)
        self._eval: tuple[int, int, torch.Tensor, torch.Tensor] | None = None
        self._scratch: nn.Module | None = None

    @property
    def unused_params(self) -> bool:
        """In the supernet each step trains one candidate: the other blocks get no gradient."""
        return self.supernet is not None

    def depths_now(self) -> list[int]:
        """The depths the steps of this epoch train, each as often (for the FLOPs count)."""
        return list(self.supernet["depths"]) if self.supernet is not None else [self.depth_target]

    def enter(self, stage: Stage, step: int) -> bool:
        self.stage, changed = stage, False
        pending = [d for d in self.decisions if not d["applied"]]
        if pending:
            self._cut(pending[0], step)
            changed = True
        k = stage_at(self.run_cfg, step // self.spe)
        if self.supernet is None and not any(d["stage"] == k for d in self.decisions):
            changed |= self._begin(k, step)
        if self.supernet is None:
            return super().enter(replace(stage, depth=self.depth_target), step) or changed
        self.drop_path = stage.drop_path
        self._set_candidate(step)
        self._set_gates(step)
        return changed

    def _begin(self, k: int, step: int) -> bool:
        """The search of stage `k`: a decision at once with one candidate, else the supernet."""
        epoch = self.scfg.stages[k].epoch
        have = 0 if step == 0 else len(self.model.layer_plan)
        depths = candidates(self.scfg.stages[k].depths, have)
        if len(depths) == 1:
            self.depth_target = depths[0]
            self._record({"depths": depths, "loss": None, "time": None, "score": None, "fit": None,
                          "rule": "one candidate", "winner": 0, "stage": k, "epoch": epoch, "step": step,
                          "plan": list(range(depths[0])), "applied": True})
            return False
        top = depths[-1]
        if step == 0:  # from scratch: the candidates are prefixes of the top depth's blocks
            growth.apply_plan(self.model, list(range(top)))
            order = list(range(top))
        else:
            moves = growth.grow(self.model, self.cfg.op, top, self.ema, self.cfg.map)
            optim.regrow_state(self.optimizer, self.model.blocks, moves, self.cfg.optimizer)
            self.grown_at = step
            order = [m.block for m in moves if m.continues] + [m.block for m in moves if not m.continues]
        self.physical = list(range(top))  # the supernet's blocks; a step's candidate runs a subset
        self.supernet = {"stage": k, "epoch": epoch, "depths": depths, "plan": list(range(top)),
                         "plans": [sorted(order[:d]) for d in depths], "loss_sum": [0.0] * len(depths),
                         "time_sum": [0.0] * len(depths), "snapshots": 0, "began": time.time(),
                         "scoring_seconds": 0.0}
        self.score_ema = {k_: v.detach().clone() for k_, v in self.model.state_dict().items()
                          if torch.is_floating_point(v)}
        if self.logger is not None:
            self.logger.log({"search/begin": k, "search/candidates": depths}, step)
        return True

    def _set_candidate(self, step: int) -> None:
        plans = self.supernet["plans"]
        self.model.layer_plan = plans[uniform_candidate(self.run_cfg.seed, step, len(plans))]
        if self.drop_path is not None:
            growth.set_drop_path(self.model, self.drop_path)

    def after_step(self, step: int) -> None:
        super().after_step(step)
        if self.supernet is None:
            return
        live = self.model.state_dict()
        names = list(self.score_ema)
        torch._foreach_lerp_([self.score_ema[n] for n in names], [live[n].detach() for n in names],
                             1.0 - self.scfg.ema_decay)
        last_epoch = self.supernet["epoch"] + self.scfg.search_epochs - 1
        n = self.scfg.snapshots
        due = {last_epoch * self.spe + round((i + 1) * self.spe / n) for i in range(n)}
        if step in due:
            self._snapshot()
        if step == (last_epoch + 1) * self.spe:
            self._decide(step)
        else:
            self._set_candidate(step)

    # -- scoring

    def _eval_set(self, res: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the fixed evaluation set at `res`: the same images (spread over the
        train file), centre crops and per-image mask noise whenever it is built."""
        if self._eval is None or self._eval[0] != res:
            from fastssl.data import make_eval_loader
            from fastssl.data.subset import read_labels

            path, info = self.run_cfg.data.train, self.info
            count = len(read_labels(path))
            picks = torch.linspace(0, count - 1, min(self.scfg.eval_images, count)).long().unique()
            g = torch.Generator().manual_seed(self.run_cfg.seed + 0x5EA2C4)
            noise = torch.rand(len(picks), (res // self.run_cfg.model.patch_size) ** 2, generator=g)
            mine = picks[info.rank::info.world_size]
            images = torch.empty(0)
            if len(mine):
                loader = make_eval_loader(path, batch_size=self.scfg.eval_batch, res=res, num_workers=1,
                                          device="cpu", indices=mine.numpy())
                images = torch.cat([x for x, _ in loader])
            self._eval = (res, len(picks), images, noise[info.rank::info.world_size])
        return self._eval[2], self._eval[3]

    def _scored_model(self) -> nn.Module:
        if self._scratch is None:
            self._scratch = self.build().to(self.info.device)
        self._scratch.load_state_dict(self.score_ema, strict=False)
        return self._scratch

    @torch.no_grad()
    def _losses(self, model: nn.Module, images: torch.Tensor, noise: torch.Tensor) -> list[float]:
        """Each candidate's mean masked-patch loss over the whole evaluation set (all ranks)."""
        model.eval()
        sums = torch.zeros(len(self.supernet["plans"]), dtype=torch.float64, device=self.info.device)
        bs = self.scfg.eval_batch
        for c, plan in enumerate(self.supernet["plans"]):
            model.layer_plan = plan
            for i in range(0, len(images), bs):
                x, nz = images[i:i + bs].to(self.info.device), noise[i:i + bs].to(self.info.device)
                with dist.autocast(self.run_cfg.precision, self.info.device):
                    loss = model(x, mask_ratio=self.run_cfg.mask_ratio, noise=nz)[0]
                sums[c] += loss.double() * len(x)  # a batch's loss is the mean over its images' masked patches
        sums = dist.all_reduce_mean(sums) * self.info.world_size
        return (sums / self._eval[1]).tolist()

    def _times(self, model: nn.Module, images: torch.Tensor, noise: torch.Tensor) -> list[float]:
        """T per candidate: training FLOPs per image (`fastssl.flops`), or the measured seconds of a
        micro-batch's forward + backward (encoder and decoder), the slowest rank's."""
        from fastssl.train.flop_count import train_flops_per_image

        stage, cfg = self.stage, self.run_cfg
        if self.scfg.time == "flops":
            return [float(train_flops_per_image(cfg.model.size, cfg.model.patch_size, replace(stage, depth=d)))
                    for d in self.supernet["depths"]]
        micro = batch_split(stage, cfg, self.info.world_size)[0]
        x, nz = images[:micro].to(self.info.device), noise[:micro].to(self.info.device)
        model.train()
        seconds = []
        for plan in self.supernet["plans"]:
            model.layer_plan = plan
            runs = []
            for _ in range(4):  # the first warms the allocator and kernels up
                _sync(self.info.device)
                t0 = time.perf_counter()
                with dist.autocast(cfg.precision, self.info.device):
                    loss = model(x, mask_ratio=stage.mask_ratio, noise=nz, views=stage.mask_views)[0]
                loss.backward()
                _sync(self.info.device)
                runs.append(time.perf_counter() - t0)
                model.zero_grad(set_to_none=True)
            seconds.append(float(np.median(runs[1:])))
        t = torch.tensor(seconds, dtype=torch.float64, device=self.info.device)
        if torch_dist.is_initialized():
            torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return t.tolist()

    def _snapshot(self) -> None:
        t0 = time.perf_counter()
        images, noise = self._eval_set(self.stage.res)
        model = self._scored_model()
        losses, times = self._losses(model, images, noise), self._times(model, images, noise)
        sn = self.supernet
        sn["loss_sum"] = [a + b for a, b in zip(sn["loss_sum"], losses)]
        sn["time_sum"] = [a + b for a, b in zip(sn["time_sum"], times)]
        sn["snapshots"] += 1
        sn["scoring_seconds"] += time.perf_counter() - t0

    def _decide(self, step: int) -> None:
        sn = self.supernet
        n = max(sn["snapshots"], 1)
        decision = decide(sn["depths"], [x / n for x in sn["loss_sum"]], [x / n for x in sn["time_sum"]])
        decision["winner"] = broadcast_winner(decision["winner"], self.info.device)
        self._record({**decision, "stage": sn["stage"], "epoch": sn["epoch"], "step": step,
                      "plan": sn["plans"][decision["winner"]], "applied": False,
                      "seconds": time.time() - sn["began"], "scoring_seconds": sn["scoring_seconds"]})
        self.supernet = self.score_ema = self._scratch = self._eval = None

    def _record(self, decision: dict) -> None:
        self.decisions.append(decision)
        depth = decision["depths"][decision["winner"]]
        if self.logger is not None:
            self.logger.log({"search/stage": decision["stage"], "search/winner": depth,
                             "search/decision": {k: v for k, v in decision.items() if k != "applied"}},
                            decision["step"])
        if self.info.is_main:
            print(f"progressive.search: stage {decision['stage']} (epoch {decision['epoch']}) picks depth {depth} "
                  f"of {decision['depths']} ({decision['rule']})")

    def _cut(self, decision: dict, step: int) -> None:
        """The winner out of the supernet: its blocks to positions 0..d-1 (ascending, so every source
        is read before it is overwritten), with their optimizer state and EMA rows."""
        plan = decision["plan"]
        moves = [growth.Move(j, b, True) for j, b in enumerate(plan)]
        with torch.no_grad():
            for j, b in enumerate(plan):
                if j != b:
                    self.model.blocks[j].load_state_dict(self.model.blocks[b].state_dict())
                    if self.ema is not None:
                        self.ema.set_block(j, self.ema.block(b))
        optim.regrow_state(self.optimizer, self.model.blocks, moves, self.cfg.optimizer)
        self.physical = list(range(len(plan)))  # what DepthGrowth.enter grows from: never the supernet again
        growth.apply_plan(self.model, self.physical)
        self.depth_target, self.drop_path = len(plan), None  # drop path by the new positions
        decision["applied"] = True

    # -- checkpoint

    def state_dict(self) -> dict:
        return {**super().state_dict(),
                "search": {"decisions": [dict(d) for d in self.decisions], "depth_target": self.depth_target,
                           "supernet": dict(self.supernet) if self.supernet is not None else None,
                           "score_ema": self.score_ema}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        s = state["search"]
        self.decisions, self.depth_target = [dict(d) for d in s["decisions"]], int(s["depth_target"])
        self.supernet, self.score_ema = s["supernet"], s["score_ema"]
        if self.supernet is not None:  # every supernet block trainable; `enter` sets the step's candidate
            growth.apply_plan(self.model, self.supernet["plan"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- FLOPs of search schedules (python -m fastssl.flops) ----------------------------------------

def schedule_flops(cfg: PretrainConfig, pick: Callable[[int, list[int]], int], images: int) -> dict:
    """Training FLOPs of the schedule that `pick(stage, candidate depths) -> depth` makes: supernet
    epochs count the mean of their candidates (uniform draws), scoring counts the evaluation set's
    forwards of every candidate at every snapshot."""
    from fastssl.train.flop_count import mae_flops, train_flops_per_image
    from fastssl.train.progressive import from_config

    s, size, patch = cfg.progressive.search, cfg.model.size, cfg.model.patch_size
    schedule = from_config(cfg)
    have, chosen = 0, []
    train = supernet = scoring = 0.0
    for k, st in enumerate(s.stages):
        end = s.stages[k + 1].epoch if k + 1 < len(s.stages) else cfg.epochs
        depths = candidates(st.depths, have)
        search_end = st.epoch + (s.search_epochs if len(depths) > 1 else 0)
        depth = pick(k, depths)
        for e in range(st.epoch, end):
            stage = schedule(e)
            trained = depths if e < search_end else [depth]
            f = images * float(np.mean([train_flops_per_image(size, patch, replace(stage, depth=d)) for d in trained]))
            train += f
            supernet += f if e < search_end else 0.0
        if len(depths) > 1:
            stage = schedule(search_end - 1)
            forward = [sum(mae_flops(size, patch, stage.res, cfg.mask_ratio, d)[p] for p in ("encoder", "decoder"))
                       for d in depths]
            scoring += s.snapshots * s.eval_images * sum(forward)
        chosen.append({"stage": k, "epochs": [st.epoch, end], "candidates": depths, "depth": depth})
        have = depth
    base = images * cfg.epochs * train_flops_per_image(size, patch, Stage(cfg.data.res, cfg.mask_ratio,
                                                                           mask_views=cfg.mask_views))
    total = train + scoring
    return {"stages": chosen, "total": total, "supernet": supernet, "scoring": scoring, "baseline": base,
            "ratio": total / base}


def run_winners(run_dir: str | Path) -> dict[int, int]:
    """Stage -> depth the run in `run_dir` chose (its log.jsonl; a resumed run's repeat wins)."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise ConfigError(f"--run={str(run_dir)!r}: no log.jsonl there (a pretraining run folder)")
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {r["search/stage"]: r["search/winner"] for r in rows if "search/winner" in r}


def print_flops(cfg: PretrainConfig, images: int, run_dir: str | None) -> dict:
    """The range of a search recipe's FLOPs (shallowest and deepest picks) and a run's pick."""
    out = {"shallowest": schedule_flops(cfg, lambda k, d: d[0], images),
           "deepest": schedule_flops(cfg, lambda k, d: d[-1], images)}
    if run_dir is not None:
        won = run_winners(run_dir)
        out["run"] = schedule_flops(cfg, lambda k, d: won.get(k, d[0]), images)
        out["run"]["run_dir"] = str(run_dir)
        if len(won) < len(cfg.progressive.search.stages):
            out["run"]["note"] = f"the run decided {len(won)} of {len(cfg.progressive.search.stages)} stages"
    return out


def format_flops(out: dict) -> str:
    lines = []
    for name, r in out.items():
        picks = " -> ".join(str(s["depth"]) for s in r["stages"])
        lines.append(f"{name:>10}: depths {picks}; {r['total'] / 1e18:.3f} EFLOPs, ratio {r['ratio']:.3f}x the "
                     f"fixed-size baseline; search {(r['supernet'] + r['scoring']) / r['total']:.1%} of it "
                     f"(supernet {r['supernet'] / r['total']:.1%}, scoring {r['scoring'] / r['total']:.1%})"
                     + (f" [{r['note']}]" if "note" in r else ""))
    return "\n".join(lines)
