"""Plate and sample-site names, declared once.

Model and guide must agree on every latent site name; the KL-scale handler and the predictive
select sites by these prefixes.
"""

from __future__ import annotations

TASKS = "tasks"  # the (sequential) plate over tasks
THETA_PREFIX = "theta/"  # global latent sites theta: scaled by kl_gamma
PHI_PREFIX = "phi["  # task latent sites phi_i: scaled by kl_beta
LATENT_PREFIX = "z["  # task subspace sites z_i (models/subspace.py): scaled by their own β


def theta(module: str, key: str) -> str:
    """A global site: one component (``key``, e.g. ``"mean"``) of θ for an adapted ``module``."""
    return f"{THETA_PREFIX}{module}/{key}"


def phi(task: int, module: str) -> str:
    """Task ``task``'s weight perturbation ΔW of ``module``."""
    return f"{PHI_PREFIX}{task}]/{module}"


def latent(task: int, module: str) -> str:
    """Task ``task``'s subspace coordinates z of ``module`` (:class:`~abmll_pyro.models.subspace.TaskSubspace`)."""
    return f"{LATENT_PREFIX}{task}]/{module}"


def data(task: int) -> str:
    """The data plate of task ``task``."""
    return f"data[{task}]"


def obs(task: int) -> str:
    """The observation site of task ``task`` (gold options, or target tokens)."""
    return f"obs[{task}]"


def probs(task: int) -> str:
    """A deterministic site: the option probabilities of task ``task`` under the sampled ΔW."""
    return f"probs[{task}]"


def generated(task: int) -> str:
    """A deterministic site: the continuations' token ids of task ``task``'s prompts under the sampled ΔW."""
    return f"generated[{task}]"


def is_theta(name: str) -> bool:
    return name.startswith(THETA_PREFIX)


def is_phi(name: str) -> bool:
    return name.startswith(PHI_PREFIX)


def is_latent(name: str) -> bool:
    return name.startswith(LATENT_PREFIX)
