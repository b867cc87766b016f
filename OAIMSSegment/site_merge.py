"""Carrying one workstation's update onto a site version that moved on (issue 20, item 1).

Several workstations adapt one site model. Each computes its update on the version it loaded or
last saved (``based_on``); when another workstation saved in between, :func:`carry_update` puts
the update on the newest version instead of overwriting it:

* weights (``"model"``, and the TSCA ``"teacher"``): ``newest + (mine - based_on)``, per tensor;
* Adam (``"optimizer"``): the state Adam would hold had this workstation's ``j`` steps been taken
  after the newest version's. Adam's moments are exponential averages, so with ``j`` own steps
  ``exp_avg_mine = beta1**j * exp_avg_based_on + own``, where ``own`` is this workstation's
  gradients' share; the carried state is ``beta1**j * exp_avg_newest + own``, the same with
  ``beta2`` for ``exp_avg_sq`` (never negative: its ``own`` is a sum of squares), and
  ``step = step_newest + j`` (Adam's bias correction). A version without optimizer state (the
  pretrained version 0, a milestone) counts as a fresh Adam: step 0, zero moments.

Both rest on the approximation behind any asynchronous update (as in asynchronous SGD): that this
workstation's gradients would have been about the same on the newest weights. With the small
online learning rates the steps are small, so the other workstations' updates and this one add
up instead of one replacing the other (docs/BENCHMARKS.md, section 7, measures it). Recomputing
the update on the newest weights is not possible in general: MI steps follow clicks that the
clinician placed in answer to the predictions of the weights they were computed on.
"""

from __future__ import annotations

import torch

__all__ = ["carry_update"]


def carry_update(newest: dict, based_on: dict, mine: dict) -> dict:
    """The state ``mine`` (weights adapted from ``based_on``) carried onto ``newest``.

    All three are :meth:`~OAIMSSegment.session.InteractiveSession.state_dict` states of the same
    architecture (``"model"``, ``"optimizer"``, optionally ``"teacher"``); ``newest`` may lack
    ``"optimizer"`` (version 0 or a milestone). Other keys are taken from ``mine``.
    """
    carried = dict(mine)
    for key in ("model", "teacher"):
        if key in mine:
            new, base = _weights(newest, key), _weights(based_on, key)
            carried[key] = {name: new[name] + (tensor - base[name]) for name, tensor in mine[key].items()}
    if "optimizer" in mine:
        carried["optimizer"] = _carry_adam(newest.get("optimizer"), based_on.get("optimizer"), mine["optimizer"])
    return carried


def _weights(state: dict, key: str) -> dict[str, torch.Tensor]:
    # A state saved without a teacher loads the model's weights into it (InteractiveSession.load_state_dict).
    return state.get(key, state["model"])


def _carry_adam(newest: dict | None, based_on: dict | None, mine: dict) -> dict:
    """Adam ``state_dict`` s: ``mine``'s own steps replayed after ``newest``'s (see the module docstring)."""
    betas = {index: group["betas"] for group in mine["param_groups"] for index in group["params"]}
    newest_state = (newest or {}).get("state", {})
    based_state = (based_on or {}).get("state", {})
    state = {}
    for index, own in mine["state"].items():
        new, base = newest_state.get(index, {}), based_state.get(index, {})
        steps = float(own["step"]) - float(base.get("step", 0.0))
        carried = dict(own)
        for key, beta in (("exp_avg", betas[index][0]), ("exp_avg_sq", betas[index][1])):
            decay = beta ** steps
            zeros = torch.zeros_like(own[key])
            carried[key] = decay * new.get(key, zeros) + (own[key] - decay * base.get(key, zeros))
        carried["exp_avg_sq"].clamp_(min=0.0)  # rounding only: the exact value is a sum of squares
        step = float(new.get("step", 0.0)) + steps
        carried["step"] = torch.tensor(step, dtype=own["step"].dtype) if torch.is_tensor(own["step"]) else step
        state[index] = carried
    return {"state": state, "param_groups": mine["param_groups"]}
