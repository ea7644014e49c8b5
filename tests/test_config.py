"""TEPOConfig and the objective registry agree: the objectives, their hyper-parameters, defaults and checks.

What can be derived from the registry is (`config.OBJECTIVES`, `config.HPARAM_FIELDS`, the help texts
that list the objectives); what cannot (one dataclass field per hyper-parameter, so that TrlParser
reads it) is checked here against the registry, both ways.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import MISSING, fields

import pytest

from tepo.objectives import default_hparams, list_objectives
from tepo.training import config as config_module
from tepo.training.config import HPARAM_FIELDS, REPLACED_TRL_FIELDS, TEPOConfig, tepo_field_names

BASE = dict(per_device_train_batch_size=8, num_generations=4, max_completion_length=8, use_cpu=True)
FIELDS = {f.name: f for f in fields(TEPOConfig)}


def registry_hparams() -> dict[str, set[type]]:
    """Every hyper-parameter of every registered objective -> the types of its defaults."""
    names: dict[str, set[type]] = {}
    for objective in list_objectives():
        for name, default in default_hparams(objective).items():
            names.setdefault(name, set()).add(type(default))
    return names


def test_every_registry_hyperparameter_is_a_config_field_that_defaults_to_the_objective():
    for name, types in registry_hparams().items():
        assert name in FIELDS, f"objective hyper-parameter {name!r} has no TEPOConfig field"
        f = FIELDS[name]
        assert f.default is None and f.default_factory is MISSING, f"{name}: None must mean the objective's default"
        # the annotation as written (fields' .type is rewritten in place by HfArgumentParser, e.g. by a
        # TrlParser run earlier in the same process: `str | None` becomes `str`)
        annotation = TEPOConfig.__annotations__[name]
        assert "None" in annotation, f"{name}: {annotation} must admit None"
        for t in types - {type(None)}:
            # a bool default needs a bool field; a float default a float field (an int fits a float)
            expected = "bool" if t is bool else "float" if t in (float, int) else t.__name__
            assert expected in annotation, f"{name}: the registry's default is a {t.__name__}, the field is {annotation}"
    assert TEPOConfig.__annotations__["max_len"].startswith("int")  # the registry's default None stands for an integer T


def test_the_config_declares_no_hyperparameter_the_registry_does_not_know():
    # the hyper-parameter block: every field declared between `objective` and `dynamic_sampling` in the
    # class body (source order: dataclasses keep a redefined GRPOConfig field at GRPOConfig's place)
    body = ast.parse(textwrap.dedent(inspect.getsource(TEPOConfig))).body[0].body
    names = [node.target.id for node in body if isinstance(node, ast.AnnAssign)]
    block = names[names.index("objective") + 1: names.index("dynamic_sampling")]
    assert set(block) == set(registry_hparams()), (
        f"fields without an objective: {sorted(set(block) - set(registry_hparams()))}; "
        f"hyper-parameters outside the block: {sorted(set(registry_hparams()) - set(block))}"
    )
    assert sorted(HPARAM_FIELDS) == sorted(registry_hparams()) and len(set(HPARAM_FIELDS)) == len(HPARAM_FIELDS)
    assert set(HPARAM_FIELDS) <= tepo_field_names()


def test_the_objective_lists_in_help_texts_are_the_registry():
    objectives = list_objectives()
    assert config_module.OBJECTIVES == tuple(objectives)
    assert FIELDS["objective"].default in objectives
    help_text = FIELDS["objective"].metadata["help"]
    loss_type_message = REPLACED_TRL_FIELDS["loss_type"][1]
    assert ", ".join(objectives) in help_text
    assert f"({', '.join(objectives)})" in loss_type_message
    # objectives named by hand in a message exist
    sequence_hint = REPLACED_TRL_FIELDS["importance_sampling_level"][1]
    for name in ("gspo", "gspo_token", "tepo"):
        assert name in sequence_hint and name in objectives


@pytest.mark.parametrize("objective", list_objectives())
def test_every_objective_is_a_valid_config_and_resolves_to_the_registry_defaults(tmp_path, objective):
    config = TEPOConfig(output_dir=str(tmp_path), objective=objective, **BASE)
    # max_len unset is max_completion_length (8 here), not the registry's None (= T of each call)
    assert config.resolved_hparams() == {**default_hparams(objective), "max_len": 8}
    hp = config.objective_hparams()
    assert set(hp) == set(HPARAM_FIELDS) and hp["max_len"] == 8


def test_a_field_set_on_the_config_reaches_the_loss_and_a_foreign_one_is_refused(tmp_path):
    config = TEPOConfig(output_dir=str(tmp_path), objective="sapo", sapo_temperature_neg=2.0, **BASE)
    assert config.objective_hparams()["sapo_temperature_neg"] == 2.0
    assert config.resolved_hparams()["sapo_temperature_neg"] == 2.0
    with pytest.raises(ValueError, match="vespo_k_pos=1.0 is not a hyper-parameter of objective 'sapo'"):
        TEPOConfig(output_dir=str(tmp_path), objective="sapo", vespo_k_pos=1.0, **BASE)
    # the value checks are the registry's own
    with pytest.raises(ValueError, match="sapo_temperature_neg must be > 0"):
        TEPOConfig(output_dir=str(tmp_path), objective="sapo", sapo_temperature_neg=0.0, **BASE)
