"""The generative model: priors p(θ), p(φ_i | θ), likelihoods p(D_i | φ_i), and the model function."""

from .hierarchical import HierarchicalModel
from .likelihoods import Likelihood, OptionLikelihood, TaskData, TokenLikelihood
from .priors import FixedPrior, HierarchicalPrior, StudentTPrior, TaskPrior

__all__ = [
    "HierarchicalModel", "Likelihood", "OptionLikelihood", "TokenLikelihood", "TaskData",
    "TaskPrior", "HierarchicalPrior", "FixedPrior", "StudentTPrior",
]
