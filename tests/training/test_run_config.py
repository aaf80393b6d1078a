import pytest

from simu_fast.training.run_config import RunConfig, RunConfigError


@pytest.mark.parametrize("options, option, reason", [
    ({}, "max_steps", "or epochs is needed"),
    ({"max_steps": 0}, "max_steps", "must be at least 1, got 0"),
    ({"epochs": -1}, "epochs", "must be at least 1, got -1"),
    ({"max_steps": 2.5}, "max_steps", "must be an integer, got 2.5"),
    ({"max_steps": True}, "max_steps", "must be an integer, got True"),
    ({"max_steps": 1, "grad_accum": 0}, "grad_accum", "must be at least 1"),
    ({"max_steps": 1, "grad_accum": None}, "grad_accum", "must be an integer, got None"),
    ({"max_steps": 1, "eval_every": 0}, "eval_every", "must be at least 1"),
    ({"max_steps": 1, "save_every": "3"}, "save_every", "must be an integer, got '3'"),
    ({"max_steps": 1, "seed": -2}, "seed", "must be at least 0"),
    ({"max_steps": 1, "max_grad_norm": 0.0}, "max_grad_norm", "must be a positive number"),
    ({"max_steps": 1, "max_grad_norm": float("nan")}, "max_grad_norm", "must be a positive number"),
    ({"max_steps": 1, "autocast_dtype": "fp8"}, "autocast_dtype", "must be 'bf16', 'fp16' or None"),
    ({"max_steps": 1, "parallel": "fsdp"}, "parallel", "must be 'ddp', 'none' or None"),
    ({"max_steps": 1, "resume": "yes"}, "resume", "must be True or False"),
    ({"max_steps": 1, "keep_best": "best:score"}, "keep_best", "must be 'max:METRIC'"),
    ({"max_steps": 1, "keep_best": "max:"}, "keep_best", "must be 'max:METRIC'"),
])
def test_each_bad_option_is_named(options, option, reason):
    with pytest.raises(RunConfigError, match=reason) as info:
        RunConfig(**options)
    assert info.value.option == option and str(info.value).startswith(option)
    assert isinstance(info.value, ValueError)


def test_good_options_and_the_keep_best_rule():
    assert RunConfig(max_steps=3).keep_best_rule is None
    assert RunConfig(epochs=1, keep_best="score").keep_best_rule == ("max", "score")
    assert RunConfig(epochs=1, keep_best="min:loss").keep_best_rule == ("min", "loss")
    assert RunConfig(max_steps=1, seed=None).seed is None


def test_from_options_lists_the_known_options():
    with pytest.raises(TypeError, match=r"unknown run option\(s\) \['steps'\].*'max_steps'"):
        RunConfig.from_options({"steps": 3})
    assert RunConfig.from_options({"max_steps": 3}) == RunConfig(max_steps=3)
