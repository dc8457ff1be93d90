"""The registry: built-in names, import paths, file paths, duplicates and interface checks."""

import textwrap

import pytest
from _support.helpers import tiny_lm

from abmll_pyro import AdapterConfig, BayesLoRA, FixedPrior, HierarchicalPrior, MeanFieldGuide, PointMassGuide, StudentTPrior
from abmll_pyro.guides.amortized import AmortizedGuide
from abmll_pyro.models import TaskPrior
from abmll_pyro.registry import (GUIDES, PRIORS, Registry, load_object, register_guide, register_prior,
                                 resolve_guide, resolve_prior)


def test_builtin_names():
    assert PRIORS.names() == ["fixed", "hierarchical", "hierarchical-abml", "student-t"]
    assert GUIDES.names() == ["amortized", "low-rank-precision", "mean-field", "point-mass"]
    assert isinstance(resolve_prior("hierarchical"), HierarchicalPrior)
    assert resolve_prior("fixed", scale=0.5).scale == 0.5
    assert resolve_prior("student-t", df=5.0).df == 5.0
    assert type(resolve_guide("mean-field")) is MeanFieldGuide
    assert type(resolve_guide("point-mass")) is PointMassGuide


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown prior 'laplace'; valid names: fixed, hierarchical, hierarchical-abml, student-t"):
        resolve_prior("laplace")
    with pytest.raises(ValueError, match="valid names: amortized, low-rank-precision, mean-field, point-mass"):
        resolve_guide("meanfield")


def test_duplicates_and_bad_names_are_rejected():
    reg = Registry("prior", TaskPrior, ("hyperprior", "global_values", "task_distribution"))
    reg.register("a", FixedPrior)
    with pytest.raises(ValueError, match="'a' is already registered"):
        reg.register("a", HierarchicalPrior)
    for bad in ("", "x:y", " a"):
        with pytest.raises(ValueError, match="name"):
            reg.register(bad, FixedPrior)
    with pytest.raises(ValueError, match="'hierarchical' is already registered"):
        register_prior("hierarchical", HierarchicalPrior)
    with pytest.raises(ValueError, match="'amortized' is already registered"):
        register_guide("amortized", AmortizedGuide)


def test_register_as_decorator_then_resolve(monkeypatch):
    monkeypatch.setattr(PRIORS, "_builders", dict(PRIORS._builders))  # leave the global registry as it was

    @register_prior("wide-fixed")
    def wide(scale: float = 1.0):
        return FixedPrior(scale)

    assert resolve_prior("wide-fixed").scale == 1.0 and resolve_prior("wide-fixed", scale=2.0).scale == 2.0
    assert "wide-fixed" in PRIORS


def test_import_path_and_errors():
    assert isinstance(resolve_prior("abmll_pyro.models.priors:StudentTPrior", df=2.0), StudentTPrior)
    assert load_object("abmll_pyro.models:FixedPrior") is FixedPrior
    with pytest.raises(ImportError, match="cannot import module 'no_such_pkg.mod'"):
        resolve_prior("no_such_pkg.mod:Prior")
    with pytest.raises(AttributeError, match="module 'abmll_pyro.models.priors' has no attribute 'Laplace'"):
        resolve_prior("abmll_pyro.models.priors:Laplace")
    with pytest.raises(ValueError, match="not an import path"):
        load_object("abmll_pyro.models:")


def test_file_path_is_loaded_once(tmp_path):
    plugin = tmp_path / "my_prior.py"
    plugin.write_text(textwrap.dedent("""
        from abmll_pyro.models import FixedPrior

        class Wide(FixedPrior):
            def __init__(self, scale=3.0):
                super().__init__(scale)
    """))
    a, b = resolve_prior(f"{plugin}:Wide"), resolve_prior(f"{plugin}:Wide", scale=4.0)
    assert a.scale == 3.0 and b.scale == 4.0 and type(a) is type(b)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_prior(f"{tmp_path}/missing.py:Wide")


def test_missing_methods_are_named(tmp_path):
    class HalfPrior(TaskPrior):
        def hyperprior(self, shape, like):
            return {}

    class NotAGuide:
        def task_distribution(self, adapter, task_params, module):
            return None

    with pytest.raises(TypeError, match="HalfPrior .* does not implement global_values, task_distribution"):
        resolve_prior(HalfPrior)
    with pytest.raises(TypeError, match="does not implement init_task_params"):
        resolve_guide(NotAGuide())
    with pytest.raises(TypeError, match="does not implement init_task_params"):
        resolve_guide("abmll_pyro.models.priors:FixedPrior")


def test_objects_instances_and_constructor_errors():
    prior = FixedPrior(0.3)
    assert resolve_prior(prior) is prior
    with pytest.raises(TypeError, match="instance; it takes no arguments"):
        resolve_prior(prior, scale=1.0)
    with pytest.raises(TypeError, match="cannot build prior 'fixed' with arguments \\['sclae'\\]"):
        resolve_prior("fixed", sclae=1.0)
    with pytest.raises(TypeError, match="cannot build guide 'amortized'.*adapter"):
        resolve_guide("amortized")  # needs the adapter


def test_adapter_reaches_only_builders_that_take_it():
    adapter = BayesLoRA(tiny_lm("llama"), AdapterConfig(rank=2))
    assert isinstance(resolve_guide("amortized", adapter=adapter, hidden=8), AmortizedGuide)
    assert type(resolve_guide("mean-field", adapter=adapter)) is MeanFieldGuide
    assert isinstance(resolve_prior("hierarchical", adapter=adapter, a0=2.0), HierarchicalPrior)
